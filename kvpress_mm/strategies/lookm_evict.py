"""``lookm-evict``: LOOK-M's text-prior eviction, without merging.

Paper: Wan et al., "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal
Long-Context Inference", Findings of EMNLP 2024, https://arxiv.org/abs/2406.18139
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from kvpress_mm.compressor import ScoredCompressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.modality import Modality
from kvpress_mm.ops.budget import half_budget_window
from kvpress_mm.ops.merging import MergeMode, merge_evicted
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.selection import select_text_first
from kvpress_mm.ops.views import LayerView


def text_priority(scores: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """Non-negative ``scores`` ``[B, kvH, P]`` re-ranked so that every text entry ranks above every other one.

    ``modality`` is ``[B, P]`` (every KV head alike) or ``[B, kvH, P]`` (``LayerView.head_modality``).

    Text entries keep their score (``>= 0``); image and video entries get ``-1 / (1 + s)``, in
    ``[-1, 0)`` and increasing with ``s``: the order inside each group is kept and every
    text entry outranks every image/video entry of its row, in one tensor that any selection
    (or a wrapper's) can rank.
    """
    is_text = modality == Modality.TEXT
    if is_text.dim() == 2:  # [B, P]: the same for every KV head
        is_text = is_text[:, None, :]
    return torch.where(is_text, scores, -1.0 / (1.0 + scores))


class LookMEvict(ScoredCompressor):
    """Text-prior eviction on accumulated attention (LOOK-M without merging).

    Score: accumulated attention over all prompt queries, as ``h2o``. Keep the window of
    ``window_size`` most recent entries, then fill the remaining places with text entries first
    (highest score first), then image/video entries by score. In a text-only prompt this is
    exactly ``h2o`` without decode eviction.

    As an inner strategy of a wrapper, its :meth:`score` is that order in one tensor (the
    accumulated attention, with every text entry above every image/video entry, see
    :func:`text_priority`), its window is :meth:`protected_window`, and the merging variants
    merge the evicted entries in :meth:`finish`, within whichever kept set the wrapper chose.
    ``keep_all_text=True`` ignores budgets, so wrappers refuse it.

    Attributes:
        window_size: recent entries always kept; ``None`` means ``n_keep // 2``.
        keep_all_text: keep every text entry even beyond the budget (the official code's
            behaviour); the cache may then exceed ``n_keep``, and a prompt without images is
            not compressed at all.

    """

    needs_accumulated_attention: ClassVar[bool] = True

    window_size: int | None = Field(default=None, ge=0, description="Recent entries kept; None = n_keep // 2.")
    keep_all_text: bool = Field(default=False, description="Keep every text entry, even beyond the budget.")

    def protected_window(self, n_keep: int) -> int:
        """``window_size``, or half the budget."""
        return half_budget_window(self.window_size, n_keep)

    def score(self, layer: LayerView) -> torch.Tensor:
        """Accumulated attention with every text entry ranked above every image/video entry (float32)."""
        return text_priority(layer.accumulated_attention(), layer.head_modality)

    @property
    def respects_budgets(self) -> bool:
        """False with ``keep_all_text`` (every text entry is kept, whatever the budget)."""
        return not self.keep_all_text

    def plan(self, layer: LayerView) -> CompressionPlan:
        """Window, then text by score, then image/video by score; then :meth:`finish`."""
        windows = [self.protected_window(n) for n in layer.n_keep]
        plan = select_text_first(layer, layer.accumulated_attention(), windows, self.keep_all_text)
        return self.finish(layer, plan)


class LookMMerging(LookMEvict):
    """Base of the merging variants: ``lookm-evict``'s kept set with the evicted entries merged into it.

    Each evicted entry goes to its most similar kept entry (highest key cosine similarity, per KV
    head), and the kept entry's key and value become a combination given by the subclass's
    ``merge_mode`` (see :mod:`kvpress_mm.ops.merging`). Kept entries with nothing assigned are
    unchanged; the cache length is the same as ``lookm-evict``'s.
    """

    merge_mode: ClassVar[MergeMode]

    def finish(self, layer: LayerView, plan: CompressionPlan) -> CompressionPlan:
        """``plan``'s kept set with the evicted entries merged into it."""
        return merge_evicted(layer, plan, self.merge_mode)


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``lookm-evict``."""
    register("lookm-evict", LookMEvict)
