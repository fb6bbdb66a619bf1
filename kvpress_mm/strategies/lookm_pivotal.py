"""``lookm-pivotal``: LOOK-M's text-prior eviction with pivotal KV merging.

Paper: Wan et al., "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal
Long-Context Inference", Findings of EMNLP 2024, https://arxiv.org/abs/2406.18139
"""

from __future__ import annotations

from typing import Any, ClassVar

from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.merging import MergeMode
from kvpress_mm.strategies.lookm_evict import LookMMerging


class LookMPivotal(LookMMerging):
    """``lookm-evict``'s kept set, with the evicted entries merged into it.

    Every evicted entry ``e`` goes to its most similar kept entry ``c`` (highest key cosine
    similarity, per KV head) and first becomes a pivot ``(K_e + K_c) / 2``; then
    ``K_c' = (K_c + sum_e (K_e + K_c) / 2) / (1 + n_c)``, with ``n_c`` the entries assigned to
    ``c``. Values alike. This is the paper's main setting. Kept entries with nothing assigned
    are unchanged; the cache length is the same as ``lookm-evict``'s.
    """

    merge_mode: ClassVar[MergeMode] = "pivotal"


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``lookm-pivotal``."""
    register("lookm-pivotal", LookMPivotal)
