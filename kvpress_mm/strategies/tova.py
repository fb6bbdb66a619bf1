"""``tova``: Token Omission Via Attention, the last query's attention decides.

Paper: Oren, Hassid, Yarden, Adi, Schwartz, "Transformers are Multi-State RNNs", EMNLP 2024,
https://arxiv.org/abs/2401.06104
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from kvpress_mm.compressor import ScoredCompressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.budget import clamp_window
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.scoring import group_mean
from kvpress_mm.ops.selection import evict_lowest
from kvpress_mm.ops.views import DecodeView, LayerView

HeadAverage = Literal["layer", "group"]


class TOVA(ScoredCompressor):
    """Keeps the entries the prompt's last query attends to most.

    Score of entry ``j``: ``A[h, L-1, j]``, the attention probability of the prompt's last query
    to ``j`` (float32, itself included), averaged over heads:

    - ``head_average="layer"`` (default): over **all** query heads of the layer, so every KV
      head keeps the same entries. This is what the official TOVA code and kvpress's
      ``TOVAPress`` do (``attn_weights[:, :, -1, :].mean(dim=1)``).
    - ``head_average="group"``: over the query heads of each KV group, each KV head selecting
      its own entries (the project's first definition of ``tova`` in STRATEGIES.md).

    Keeps the ``window_size`` most recent entries (default 0: the newest entry is a candidate
    like any other, as in the paper) plus the highest-scoring others, ``n_keep`` in all.
    kvpress forces the last prompt entry into the cache: ``window_size=1`` reproduces it.

    With ``decode_eviction`` (the paper's fixed-size multi-state; default False, which
    compresses once at prefill like kvpress), every decode step's last query re-scores every
    entry it saw (its own probabilities, itself included; no accumulation, unlike ``h2o``) and
    the lowest-scoring entry outside the window is evicted, the new one included: each layer
    keeps its post-prefill size for the whole generation.

    Attributes:
        head_average: ``"layer"`` (default) or ``"group"``.
        window_size: recent entries always kept (default 0).
        decode_eviction: keep evicting one entry per decode step (constant cache size).

    """

    head_average: HeadAverage = Field(default="layer", description="Average over all heads, or per KV group.")
    window_size: int = Field(default=0, ge=0, description="Recent entries always kept.")
    decode_eviction: bool = Field(default=False, description="Evict one entry per decode step (constant size).")

    def protected_window(self, n_keep: int) -> int:
        """``window_size``."""
        return self.window_size

    def _average(self, probabilities: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """``[B, Hq, kv]`` -> ``[B, kvH, kv]`` by :attr:`head_average`."""
        if self.head_average == "layer":
            return probabilities.mean(1, keepdim=True).expand(-1, kv_heads, -1)
        return group_mean(probabilities, kv_heads)

    def score(self, layer: LayerView) -> torch.Tensor:
        """The last prompt query's attention, averaged by :attr:`head_average`, ``[batch, kv_heads, seq]`` float32."""
        # the last query of every row is the last (padded) position: batches are left-padded
        return self._average(layer.window_attention_per_head(1), layer.kv_heads).contiguous()

    def finish(self, layer: LayerView, plan: CompressionPlan) -> CompressionPlan:
        """Remember each row's window for decode-time eviction (the layer keeps its own size)."""
        if self.decode_eviction:
            layer.state["tova_windows"] = [clamp_window(self.window_size, n) for n in layer.n_keep]
        return plan

    @property
    def acts_while_decoding(self) -> bool:
        """True with ``decode_eviction`` (the session then builds a decode-time view at every step)."""
        return self.decode_eviction

    def decode_plan(self, layer: DecodeView) -> CompressionPlan | None:
        """Re-score every entry by the step's last query and evict the lowest, back to the layer's size."""
        if not self.decode_eviction or "tova_windows" not in layer.state:
            return None
        new = layer.queries.shape[2]
        scores = self._average(layer.attention()[:, :, -1], layer.kv_heads).clone()  # [B, kvH, kv]
        total = scores.shape[-1]
        # filler slots (at the front of the compressed part) are never evicted
        filler = ~layer.slot_valid[:, : total - new]
        scores[:, :, : total - new].masked_fill_(filler[:, None, :], float("inf"))
        kept_indices = evict_lowest(scores, layer.state["tova_windows"], new)
        return CompressionPlan(kept_indices, layer.slot_valid[:, : total - new])


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``tova``."""
    register("tova", TOVA)
