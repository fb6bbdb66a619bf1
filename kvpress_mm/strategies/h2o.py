"""``h2o``: Heavy-Hitter Oracle, accumulated attention with decode-time eviction.

Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models", NeurIPS 2023, https://arxiv.org/abs/2306.14048
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from kvpress_mm.compressor import ScoredCompressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.budget import clamp_window, half_budget_window
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.scoring import group_mean
from kvpress_mm.ops.selection import evict_lowest
from kvpress_mm.ops.views import DecodeView, LayerView


class H2O(ScoredCompressor):
    """Keeps the recent window plus the entries with the highest accumulated attention.

    Score: ``s[h, j] = sum_i A[h, i, j]`` over all prompt queries (query heads of a KV group
    averaged). Keeps the ``window_size`` most recent entries plus the ``n_keep - window_size``
    highest-scoring others.

    With ``decode_eviction`` (the original H2O), every decode step adds the new query's
    attention probabilities to the scores (the new entry starts from its own probability) and
    evicts the lowest-scoring entry outside the window of the ``window_size`` most recent
    entries, so each layer stays at ``n_keep`` entries for the whole generation.

    Attributes:
        window_size: recent entries always kept; ``None`` means ``n_keep // 2``.
        decode_eviction: keep evicting while decoding (constant cache size).

    """

    needs_accumulated_attention: ClassVar[bool] = True

    window_size: int | None = Field(default=None, ge=0, description="Recent entries kept; None = n_keep // 2.")
    decode_eviction: bool = Field(default=True, description="Evict one entry per decode step (constant size).")

    def protected_window(self, n_keep: int) -> int:
        """``window_size``, or half the budget."""
        return half_budget_window(self.window_size, n_keep)

    def score(self, layer: LayerView) -> torch.Tensor:
        """Accumulated attention over all prompt queries, ``[batch, kv_heads, seq]`` float32."""
        return layer.accumulated_attention()

    def finish(self, layer: LayerView, plan: CompressionPlan) -> CompressionPlan:
        """Remember the kept entries' scores and each row's window for decode-time eviction.

        Also when a wrapper chose the kept set (and the budgets, given by ``layer.n_keep``): each
        layer then keeps its own size while decoding.
        """
        if self.decode_eviction:
            scores = layer.accumulated_attention().gather(2, plan.kept_indices)
            # filler slots are never evicted
            layer.state["scores"] = scores.masked_fill(~plan.slot_valid[:, None, :], float("inf"))
            layer.state["windows"] = [clamp_window(self.protected_window(n), n) for n in layer.n_keep]
        return plan

    @property
    def acts_while_decoding(self) -> bool:
        """True with ``decode_eviction`` (the session then builds a decode-time view at every step)."""
        return self.decode_eviction

    def decode_plan(self, layer: DecodeView) -> CompressionPlan | None:
        """Add the step's attention to the scores and evict back down to the budget."""
        if not self.decode_eviction or "scores" not in layer.state:
            return None
        new = layer.queries.shape[2]
        previous: torch.Tensor = layer.state["scores"]  # [B, kvH, kv - new]
        step = group_mean(layer.attention().sum(2), layer.keys.shape[1])  # [B, kvH, kv]
        scores = torch.cat([previous, previous.new_zeros(*previous.shape[:2], new)], dim=-1) + step
        total = scores.shape[-1]
        kept_indices = evict_lowest(scores, layer.state["windows"], new)
        layer.state["scores"] = scores.gather(2, kept_indices)
        # filler slots are at the front and never evicted, so they stay there
        return CompressionPlan(kept_indices, layer.slot_valid[:, : total - new])


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``h2o``."""
    register("h2o", H2O)
