"""``lookm-evict``: LOOK-M's text-prior eviction, without merging.

Paper: Wan et al., "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal
Long-Context Inference", Findings of EMNLP 2024, https://arxiv.org/abs/2406.18139
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from kvpress_mm.compressor import Compressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.budget import half_budget_window
from kvpress_mm.ops.merging import MergeMode, merge_evicted
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.selection import select_text_first
from kvpress_mm.ops.views import LayerView


class LookMEvict(Compressor):
    """Text-prior eviction on accumulated attention (LOOK-M without merging).

    Score: accumulated attention over all prompt queries, as ``h2o``. Keep the window of
    ``window_size`` most recent entries, then fill the remaining places with text entries first
    (highest score first), then image/video entries by score. In a text-only prompt this is
    exactly ``h2o`` without decode eviction.

    Attributes:
        window_size: recent entries always kept; ``None`` means ``n_keep // 2``.
        keep_all_text: keep every text entry even beyond the budget (the official code's
            behaviour); the cache may then exceed ``n_keep``, and a prompt without images is
            not compressed at all.

    """

    needs_accumulated_attention: ClassVar[bool] = True

    window_size: int | None = Field(default=None, ge=0, description="Recent entries kept; None = n_keep // 2.")
    keep_all_text: bool = Field(default=False, description="Keep every text entry, even beyond the budget.")

    def plan(self, layer: LayerView) -> CompressionPlan:
        """Window, then text by score, then image/video by score."""
        windows = [half_budget_window(self.window_size, n) for n in layer.n_keep]
        return select_text_first(layer, layer.accumulated_attention(), windows, self.keep_all_text)


class LookMMerging(LookMEvict):
    """Base of the merging variants: ``lookm-evict``'s kept set with the evicted entries merged into it.

    Each evicted entry goes to its most similar kept entry (highest key cosine similarity, per KV
    head), and the kept entry's key and value become a combination given by the subclass's
    ``merge_mode`` (see :mod:`kvpress_mm.ops.merging`). Kept entries with nothing assigned are
    unchanged; the cache length is the same as ``lookm-evict``'s.
    """

    merge_mode: ClassVar[MergeMode]

    def plan(self, layer: LayerView) -> CompressionPlan:
        """The text-prior kept set with the evicted entries merged."""
        return merge_evicted(layer, super().plan(layer), self.merge_mode)


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``lookm-evict``."""
    register("lookm-evict", LookMEvict)
