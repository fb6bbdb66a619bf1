"""A naive reference of AdaKV's kept sets, written from the definition with python lists (not from the code)."""

from __future__ import annotations

from collections.abc import Sequence


def naive_adakv(scores: Sequence[Sequence[float]], n_keep: int, window: int, floor: int) -> list[list[int]]:
    """Per head, the kept indices (into the row's real entries, ascending) of one row under ``adakv``.

    ``scores[h][j]``: head ``h``'s score of the row's ``j``-th real entry. Every head keeps the last
    ``min(window, n_keep)`` entries and its best others up to ``max(floor, window)`` (ties: earlier
    entry first); then the best remaining ``(head, entry)`` pairs of all heads (ties: lower head,
    then earlier entry) fill the row's total of ``heads * n_keep``.
    """
    heads, length = len(scores), len(scores[0])
    if n_keep >= length:
        return [list(range(length)) for _ in range(heads)]
    window = max(0, min(window, n_keep))
    first = max(window, min(floor, n_keep))
    kept = [set(range(length - window, length)) for _ in range(heads)]
    for h in range(heads):
        others = sorted(range(length - window), key=lambda j: (-scores[h][j], j))
        kept[h].update(others[: first - window])
    pool = sorted((-scores[h][j], h, j) for h in range(heads) for j in range(length - window) if j not in kept[h])
    for _, h, j in pool[: heads * n_keep - heads * first]:
        kept[h].add(j)
    return [sorted(k) for k in kept]
