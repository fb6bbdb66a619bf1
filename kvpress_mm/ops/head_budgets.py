"""Per-head budgets inside a layer: AdaKV's allocation and the ragged selection that fills it.

AdaKV (arXiv 2407.11550) keeps a layer's total budget ``kv_heads * n_keep`` but lets the KV
heads share it by their scores: heads whose attention is spread out keep more entries, heads
whose attention is concentrated keep fewer. :func:`adaptive_head_counts` decides how many
entries each head of a row keeps; :func:`select_head_counts` turns the counts into a ragged
:class:`~kvpress_mm.CompressionPlan` (each head: its window plus its top-ranked others).

Ties are broken the same way everywhere, so that the split into counts and selection is
lossless (a head's share of the cross-head top is exactly its own top): among equal scores,
the lower head first, then the earlier position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpress_mm.ops.plan import CompressionPlan, ragged_plan
from kvpress_mm.ops.views import LayerView


def adaptive_head_counts(scores: torch.Tensor, n_keep: int, window: int, floor: int) -> torch.Tensor:
    """How many entries each KV head of one row keeps under AdaKV: ``[heads]`` long, summing to ``heads * n_keep``.

    Args:
        scores: ``[heads, L]`` float32 scores of the row's ``L`` real entries (higher = keep),
            compared across heads as they are.
        n_keep: the row's budget per head (its mean count); ``n_keep >= L`` keeps everything.
        window: the protected window (the last ``window`` entries, clamped to ``n_keep``),
            kept by every head and counted against its share.
        floor: entries every head keeps first (``int(alpha * n_keep)``, clamped to
            ``[window, n_keep]``): its window plus its best others by its own scores.

    Each head first keeps ``max(floor, window)`` entries; the remaining
    ``heads * (n_keep - max(floor, window))`` places go to the highest-scoring entries outside
    every head's first picks, across all heads (ties: lower head, then earlier position). A head
    never keeps more than ``L``.

    Examples:
        >>> scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 0.0, 0.0, 0.0]])
        >>> adaptive_head_counts(scores, n_keep=2, window=0, floor=0).tolist()
        [4, 0]
        >>> adaptive_head_counts(scores, n_keep=2, window=0, floor=1).tolist()
        [3, 1]
        >>> adaptive_head_counts(scores, n_keep=2, window=1, floor=0).tolist()
        [3, 1]

    """
    heads, length = int(scores.shape[0]), int(scores.shape[1])
    if n_keep >= length:
        return torch.full((heads,), length, dtype=torch.long)
    window = max(0, min(window, n_keep))
    first = max(window, min(floor, n_keep))
    outside = scores[:, : length - window]  # [H, M]: the candidates, window excluded
    ranked = outside.sort(dim=-1, descending=True, stable=True).values  # ties: earlier position first
    rest = ranked[:, first - window :]  # [H, M - first + window]: what the floors left
    places = heads * (n_keep - first)
    counts = torch.full((heads,), first, dtype=torch.long)
    if places > 0:
        # a stable sort of the head-major flattening: ties go to the lower head, then the earlier position
        order = rest.flatten().sort(descending=True, stable=True).indices[:places]
        counts += torch.bincount(order // rest.shape[1], minlength=heads)
    return counts


def select_head_counts(
    layer: LayerView, scores: torch.Tensor, windows: Sequence[int], counts: Sequence[torch.Tensor]
) -> CompressionPlan:
    """Each head of each row keeps its window plus its ``counts[b][h] - window`` top-ranked other entries.

    Args:
        layer: the layer being compressed.
        scores: ``[batch, kv_heads, seq]`` float32 ranking (higher = keep); padding is ignored.
        windows: each row's window (already clamped to its budget, at most every count).
        counts: each row's ``[kv_heads]`` counts (:func:`adaptive_head_counts`).

    Returns:
        A ragged plan (rectangular when every head of each row has the same count). Within a
        head, ties go to the earlier position.

    """
    rows = []
    for b in range(layer.batch_size):
        positions = layer.real_positions(b)
        length, window = int(positions.numel()), windows[b]
        row_scores = scores[b][:, positions[: length - window]]  # [H, M]
        order = row_scores.sort(dim=-1, descending=True, stable=True).indices
        recent = torch.arange(length - window, length, device=positions.device)
        heads = []
        for h, count in enumerate(counts[b].tolist()):
            if count >= length:
                heads.append(positions)
                continue
            chosen = order[h, : count - window].sort().values
            heads.append(positions[torch.cat([chosen, recent])])
        rows.append(heads)
    return ragged_plan(rows)
