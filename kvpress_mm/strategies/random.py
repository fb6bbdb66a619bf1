"""``random``: keeps a uniformly random subset of entries per KV head (a sanity baseline)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kvpress_mm.compressor import ScoredCompressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.views import LayerView


class Random(ScoredCompressor):
    """Keeps ``n_keep`` entries chosen uniformly at random per KV head.

    Deterministic given ``seed``: layer ``i`` draws from a generator seeded with ``seed``
    and ``i``, so layers differ but runs repeat. Each row draws over its own real entries, so a
    prompt gets the same selection alone and inside a padded batch.

    Attributes:
        seed: seed of the random choice (default 0).

    """

    seed: int = Field(default=0, ge=0, description="Seed of the random choice.")

    def score(self, layer: LayerView) -> torch.Tensor:
        """Independent uniform scores: the top ``n_keep`` form a uniform random subset."""
        scores = torch.zeros(layer.batch_size, layer.kv_heads, layer.seq_len)
        for b in range(layer.batch_size):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer.layer_idx)
            positions = layer.real_positions(b).cpu()
            scores[b][:, positions] = torch.rand(layer.kv_heads, positions.numel(), generator=generator)
        return scores.to(layer.keys.device)


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``random``."""
    register("random", Random)
