"""``knorm``: keep the keys with the lowest L2 norm.

Paper: Devoto, Zhao, Scardapane, Minervini, "A Simple and Effective L2 Norm-Based Strategy for
KV Cache Compression", EMNLP 2024, https://arxiv.org/abs/2406.11430
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kvpress_mm.compressor import ScoredCompressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.views import LayerView


class KNorm(ScoredCompressor):
    """Keeps the entries whose keys have the smallest L2 norm (no attention needed).

    Score: ``-||K[h, j]||_2`` per KV head, of the keys as cached (after RoPE), computed in
    float32 (bf16 norms would tie). RoPE rotates pairs of channels, so the norm is the same
    before and after it up to rounding (Qwen's multimodal RoPE too). Keeps the ``window_size``
    most recent entries (default 0) plus the lowest-norm others, ``n_keep`` in all.

    Matches kvpress's ``KnormPress`` (``int`` budget, every layer). The official code
    (``l2compress``) keeps ``ceil(keep_ratio * L)`` entries, and its README example leaves
    layers 0 and 1 uncompressed; here every layer keeps ``n_keep`` like every other strategy.

    Attributes:
        window_size: recent entries always kept (default 0).

    """

    window_size: int = Field(default=0, ge=0, description="Recent entries always kept.")

    def protected_window(self, n_keep: int) -> int:
        """``window_size``."""
        return self.window_size

    def score(self, layer: LayerView) -> torch.Tensor:
        """``-||K||_2`` per entry and KV head, ``[batch, kv_heads, seq]`` float32."""
        return -layer.keys.float().norm(dim=-1)


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``knorm``."""
    register("knorm", KNorm)
