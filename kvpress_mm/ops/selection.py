"""Turning scores into kept sets: budgets, windows, padding and LOOK-M's text prior.

Everything here works row by row on the real (non-padding) positions, so a strategy never
has to think about padding or about rows with different budgets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvpress_mm.errors import InvalidPlanError
from kvpress_mm.modality import Modality
from kvpress_mm.ops.budget import clamp_window
from kvpress_mm.ops.plan import CompressionPlan, stack_rows
from kvpress_mm.ops.views import LayerView


def per_row(value: int | Sequence[int], batch: int) -> list[int]:
    """An int for every row, from one int or a per-row sequence."""
    if isinstance(value, int):
        return [value] * batch
    return [int(v) for v in value]


def check_scores(scores: torch.Tensor, layer: LayerView, origin: str) -> torch.Tensor:
    """Validate a strategy's scores ``[batch, kv_heads, seq]`` and return them as float32."""
    expected = (layer.batch_size, layer.kv_heads, layer.seq_len)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise InvalidPlanError(
            f"{origin}.score() must return a float tensor of shape [batch, kv_heads, seq] = "
            f"{list(expected)}, got {shape}"
        )
    scores = scores.float()
    real = layer.key_valid[:, None, :].expand_as(scores)
    if torch.isnan(scores[real]).any():
        raise InvalidPlanError(f"{origin}.score() returned NaN scores for real (non-padding) entries")
    return scores


def _topk_sorted(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[H, k]`` of the ``k`` largest entries of each row of ``values``, ascending."""
    if k <= 0:
        return torch.empty(values.shape[0], 0, dtype=torch.long, device=values.device)
    return values.topk(k, dim=-1).indices.sort(dim=-1).values


def _keep_all(layer: LayerView, positions: torch.Tensor) -> torch.Tensor:
    return positions.expand(layer.kv_heads, -1)


def select_per_row(
    layer: LayerView,
    window_size: int | Sequence[int],
    choose: Callable[[int, int, int], torch.Tensor],
) -> CompressionPlan:
    """Each row's window of most recent entries plus what ``choose`` picks among the others.

    The shape of every window-based selection. A row whose budget covers it keeps everything;
    otherwise its window (clamped to the budget) is kept and ``choose(b, outside, budget)``
    returns ``[kv_heads, budget]`` ascending indices into the row's ``outside`` oldest real
    entries (``layer.real_positions(b)[:outside]``).

    Args:
        layer: the layer being compressed.
        window_size: entries of the window (per row or one for all).
        choose: the per-row choice among the entries outside the window.

    """
    windows = per_row(window_size, layer.batch_size)
    rows = []
    for b in range(layer.batch_size):
        positions = layer.real_positions(b)
        length, n_keep = int(positions.numel()), layer.n_keep[b]
        if n_keep >= length:
            rows.append(_keep_all(layer, positions))
            continue
        window = clamp_window(windows[b], n_keep)
        chosen = choose(b, length - window, n_keep - window)
        recent = torch.arange(length - window, length, device=positions.device).expand(layer.kv_heads, -1)
        rows.append(positions[torch.cat([chosen, recent], dim=-1)])
    kept, valid = stack_rows(rows)
    return CompressionPlan(kept, valid)


def clamped_windows(layer: LayerView, window_size: int | Sequence[int]) -> list[int]:
    """Each row's window clamped to its budget (what the row protects when it is compressed)."""
    windows = per_row(window_size, layer.batch_size)
    return [clamp_window(w, n) for w, n in zip(windows, layer.n_keep, strict=True)]


def select_top_with_window(layer: LayerView, scores: torch.Tensor, window_size: int | Sequence[int]) -> CompressionPlan:
    """Keep each row's window of most recent entries plus its highest-scoring other entries.

    The entries outside the window are ranked by ``layer.selection_scores(scores, windows)``:
    the scores themselves unless a wrapper set a selection transform (``mixkv``).

    Args:
        layer: the layer being compressed.
        scores: ``[batch, kv_heads, seq]`` float, higher = keep. Padding is ignored.
        window_size: entries of the window (per row or one for all); clamped to the budget.

    """
    scores = layer.selection_scores(scores, clamped_windows(layer, window_size))

    def top(b: int, outside: int, budget: int) -> torch.Tensor:
        return _topk_sorted(scores[b][:, layer.real_positions(b)[:outside]], budget)

    return select_per_row(layer, window_size, top)


def select_text_first(
    layer: LayerView,
    scores: torch.Tensor,
    window_size: int | Sequence[int],
    keep_all_text: bool = False,
) -> CompressionPlan:
    """LOOK-M's text prior: window first, then text by score, then image/video by score.

    With ``keep_all_text`` every text entry outside the window is kept even beyond the budget,
    and image/video entries fill what is left of the budget (possibly nothing). Scores are
    ranked through ``layer.selection_scores`` (see :func:`select_top_with_window`).

    Text is decided per KV head (``layer.head_modality``): a re-planned cache
    (:class:`~kvpress_mm.ops.cache_view.CacheView`) may hold a text entry in one head and an image
    entry in another at the same slot; each head then fills its budget text first on its own.
    """
    scores = layer.selection_scores(scores, clamped_windows(layer, window_size))
    neg_inf = torch.tensor(float("-inf"), device=scores.device)
    head_modality = layer.head_modality

    def text_first(b: int, outside: int, budget: int) -> torch.Tensor:
        positions = layer.real_positions(b)[:outside]
        row_scores = scores[b][:, positions]  # [kvH, outside]
        is_text = head_modality[b][:, positions] == Modality.TEXT  # [kvH, outside]
        if not bool((is_text == is_text[:1]).all()):
            if keep_all_text:
                raise InvalidPlanError("keep_all_text needs the same text entries in every KV head (a prefill)")
            # each head on its own: every text entry ranks above every image/video entry
            finite = torch.where(row_scores.isfinite(), row_scores, 0.0)
            lift = (finite.max() - finite.min()).abs() + 1.0 if finite.numel() else 1.0
            return _topk_sorted(row_scores + is_text * lift, budget)
        n_text = int(is_text[0].sum())
        if n_text >= budget and not keep_all_text:
            return _topk_sorted(torch.where(is_text, row_scores, neg_inf), budget)
        text = is_text[0].nonzero().squeeze(-1).expand(layer.kv_heads, -1)
        media = _topk_sorted(torch.where(is_text, neg_inf, row_scores), max(0, budget - n_text))
        return torch.cat([text, media], dim=-1).sort(dim=-1).values

    return select_per_row(layer, window_size, text_first)


def keep_everything(layer: LayerView) -> CompressionPlan:
    """A plan that keeps every real entry of every row (padding is still dropped)."""
    rows = [_keep_all(layer, layer.real_positions(b)) for b in range(layer.batch_size)]
    kept, valid = stack_rows(rows)
    return CompressionPlan(kept, valid)


def evict_lowest(scores: torch.Tensor, windows: Sequence[int], new: int) -> torch.Tensor:
    """Decode-time eviction: drop each (row, KV head)'s ``new`` lowest-scoring entries outside its window.

    The shape of ``h2o``'s and ``tova``'s per-step eviction, which keeps a layer's size constant.

    Args:
        scores: ``[batch, kv_heads, kv]`` float; ``inf`` marks entries that must never be evicted
            (filler slots).
        windows: each row's protected window: its last ``windows[b]`` entries are never evicted.
        new: entries to evict per row and head (the step's new tokens).

    Returns:
        ``[batch, kv_heads, kv - new]`` ascending indices of the kept entries.

    """
    total = scores.shape[-1]
    evictable = torch.ones_like(scores, dtype=torch.bool)
    for b, window in enumerate(windows):
        if window:
            evictable[b, :, total - window :] = False
    candidates = scores.masked_fill(~evictable, float("inf"))
    evicted = (-candidates).topk(new, dim=-1).indices  # the `new` lowest per (row, head)
    keep = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, evicted, False)
    return keep.nonzero()[:, 2].view(*scores.shape[:2], total - new)
