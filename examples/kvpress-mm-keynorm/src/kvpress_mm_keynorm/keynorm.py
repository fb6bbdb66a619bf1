"""The ``keynorm`` strategy: keep the entries whose keys have the smallest L2 norm.

Paper: Devoto, Zhao, Scardapane and Minervini, "A Simple and Effective L2 Norm-Based Strategy
for KV Cache Compression", EMNLP 2024, https://arxiv.org/abs/2406.11430
"""

from __future__ import annotations

import torch
from kvpress_mm import LayerView, ScoredCompressor
from pydantic import Field


class KeyNorm(ScoredCompressor):
    """Keeps the entries whose keys have the smallest L2 norm, plus an optional recent window.

    Devoto et al. observe that a cached key with a low L2 norm usually receives high attention
    while decoding, so the norm alone, computed before any query is seen, ranks the entries.
    Score: ``-||K[b, h, j]||_2`` for every entry ``j`` of every KV head ``h`` (float32), so
    each KV head keeps its own lowest-norm keys. No attention weights are needed.

    The framework keeps the ``window_size`` most recent entries of each row, then the
    highest-scoring (lowest-norm) others up to the row's budget ``int(L * (1 - r))``.

    Attributes:
        window_size: most recent prompt entries always kept (default 0: the paper's rule,
            which ranks every entry by its norm). Clamped to the budget.

    """

    window_size: int = Field(default=0, ge=0, description="Most recent entries always kept (0 = the paper's rule).")

    def protected_window(self, n_keep: int) -> int:
        """``window_size`` (the framework clamps it to ``n_keep``)."""
        return self.window_size

    def score(self, layer: LayerView) -> torch.Tensor:
        """Negative L2 norm of each key, ``[batch, kv_heads, seq]`` float32: small norm = keep."""
        return -layer.keys.float().norm(dim=-1)
