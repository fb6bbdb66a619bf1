"""``lookm-average``: LOOK-M's text-prior eviction with average KV merging.

Paper: Wan et al., "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal
Long-Context Inference", Findings of EMNLP 2024, https://arxiv.org/abs/2406.18139
"""

from __future__ import annotations

from typing import Any, ClassVar

from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.merging import MergeMode
from kvpress_mm.strategies.lookm_evict import LookMMerging


class LookMAverage(LookMMerging):
    """``lookm-evict``'s kept set, with the evicted entries merged into it.

    ``K_c' = (K_c + sum_e K_e) / (1 + n_c)``: every evicted entry is averaged into its
    most similar kept entry (highest key cosine similarity, per KV head). Values alike.
    Kept entries with nothing assigned are unchanged; the cache length is the same as
    ``lookm-evict``'s.
    """

    merge_mode: ClassVar[MergeMode] = "average"


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``lookm-average``."""
    register("lookm-average", LookMAverage)
