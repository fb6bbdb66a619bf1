"""A test-only strategy whose plans are ragged: the KV heads of a row keep different numbers of entries.

It exercises the ragged storage, the session's per-head attention and the references without
depending on ``adakv``'s selection: head ``h`` of a row with budget ``n`` keeps ``n + d_h``
random entries, where the shifts ``d_h`` alternate ``+d, -d`` over pairs of heads (an odd last
head keeps ``n``), so the row's total stays ``kv_heads * n`` and ``d`` grows with the layer and
the row's length (different rows, different layers, different shapes).
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvpress_mm import Compressor, LayerView
from kvpress_mm.ops.plan import CompressionPlan, ragged_plan


def head_budgets(n_keep: int, length: int, heads: int, skew: int, allow_empty: bool = False) -> list[int]:
    """Each head's count: ``n_keep`` shifted by ``+d, -d`` over pairs of heads, ``0 <= d <= skew``, within ``[1, L]``.

    With ``allow_empty`` a head may keep nothing (``[0, L]``).
    """
    d = max(0, min(skew, n_keep - (0 if allow_empty else 1), length - n_keep))
    budgets = [n_keep] * heads
    for h in range(0, heads - 1, 2):
        budgets[h] += d
        budgets[h + 1] -= d
    return budgets


class SkewedHeads(Compressor):
    """Random entries per KV head, with heads of a row keeping different counts (total ``kv_heads * n_keep``).

    Attributes:
        skew: the largest shift ``d`` of a head's count away from ``n_keep``; the shift used is
            ``skew - (layer_idx + L) % 2`` (clamped; ``L`` the row's length), so layers and rows
            differ, while rows with the same prompt length choose alike (beam search's repeated rows).
        seed: seed of the random scores.
        allow_empty: let a head of a row keep no entry at all (``adakv`` may, with a floor of 0).

    """

    skew: int = Field(default=3, ge=0)
    seed: int = 0
    allow_empty: bool = False

    def plan(self, layer: LayerView) -> CompressionPlan:
        """Each head's own random subset of the row's real positions, of the head's count."""
        rows = []
        for b in range(layer.batch_size):
            positions = layer.real_positions(b)
            length = int(positions.numel())
            # a row's choice depends on its layer and length only: repeated rows (beams) choose alike
            generator = torch.Generator().manual_seed(self.seed + 7919 * layer.layer_idx + length)
            n_keep = min(layer.n_keep[b], length)
            skew = max(0, self.skew - (layer.layer_idx + length) % 2)
            counts = head_budgets(n_keep, length, layer.kv_heads, skew, self.allow_empty)
            heads = []
            for count in counts:
                chosen = torch.randperm(length, generator=generator)[:count].sort().values
                heads.append(positions[chosen.to(positions.device)])
            rows.append(heads)
        return ragged_plan(rows)
