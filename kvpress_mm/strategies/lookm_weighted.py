"""``lookm-weighted``: LOOK-M's text-prior eviction with weighted KV merging.

Paper: Wan et al., "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal
Long-Context Inference", Findings of EMNLP 2024, https://arxiv.org/abs/2406.18139
"""

from __future__ import annotations

from typing import Any, ClassVar

from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.merging import MergeMode
from kvpress_mm.strategies.lookm_evict import LookMMerging


class LookMWeighted(LookMMerging):
    """``lookm-evict``'s kept set, with the evicted entries merged into it.

    ``K_c' = (K_c + sum_e w_e K_e) / (1 + n_c)`` where ``w_e`` is the entry's max cosine
    similarity. An evicted entry is merged only if ``w_e`` is at least the mean of ``w`` over all
    evicted entries of all KV heads of the layer (and row); ``n_c`` counts merged entries only.
    The official code averages ``w`` across heads rank by rank before filtering, which mixes
    different positions; we filter each entry on its own similarity. Values alike.
    Kept entries with nothing assigned are unchanged; the cache length is the same as
    ``lookm-evict``'s.
    """

    merge_mode: ClassVar[MergeMode] = "weighted"


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``lookm-weighted``."""
    register("lookm-weighted", LookMWeighted)
