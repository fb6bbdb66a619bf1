"""``snapkv``: attention of an observation window of recent queries, pooled.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
NeurIPS 2024, https://arxiv.org/abs/2404.14469
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from kvpress_mm.compressor import ScoredCompressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.scoring import group_mean
from kvpress_mm.ops.views import LayerView


class SnapKV(ScoredCompressor):
    """Keeps the observation window plus the prefix entries its queries attend to most.

    ``v[h, j]`` = sum over the last ``window_size`` prompt queries of ``A[h, i, j]`` for the
    prefix ``j < L - window_size``; ``v`` is smoothed along ``j`` with a 1-D pooling of
    ``kernel_size`` (stride 1, padding ``kernel_size // 2``, zero padding counted by ``avg``),
    per query head, then averaged over the query heads of a KV group (kvpress's order).
    If ``n_keep <= window_size``, the last ``n_keep`` entries are kept.

    Attributes:
        window_size: observation window, also always kept (default 32).
        kernel_size: pooling kernel, odd (default 7).
        pooling: ``"max"`` (default) or ``"avg"``.

    """

    window_size: int = Field(default=32, ge=1, description="Observation window (queries), always kept.")
    kernel_size: int = Field(default=7, ge=1, description="Pooling kernel size (odd).")
    pooling: Literal["max", "avg"] = Field(default="max", description="Pooling along the sequence.")

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"kernel_size must be odd for a same-length pooling, got {value}")
        return value

    def protected_window(self, n_keep: int) -> int:
        """The observation window."""
        return self.window_size

    def score(self, layer: LayerView) -> torch.Tensor:
        """Pooled window attention on each row's prefix, ``[batch, kv_heads, seq]`` float32."""
        per_head = layer.window_attention_per_head(self.window_size)  # [B, Hq, P]
        scores = torch.zeros(layer.batch_size, layer.kv_heads, layer.seq_len, device=per_head.device)
        for b in range(layer.batch_size):
            positions = layer.real_positions(b)
            prefix = positions[: max(0, positions.numel() - self.window_size)]
            if prefix.numel() == 0:
                continue
            v = per_head[b][:, prefix]  # [Hq, prefix]
            pad = self.kernel_size // 2
            if self.pooling == "max":
                pooled = F.max_pool1d(v[None], self.kernel_size, stride=1, padding=pad)[0]
            else:
                pooled = F.avg_pool1d(v[None], self.kernel_size, stride=1, padding=pad)[0]
            scores[b][:, prefix] = group_mean(pooled[None], layer.kv_heads)[0]
        return scores


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``snapkv``."""
    register("snapkv", SnapKV)
