"""``streaming``: StreamingLLM's attention sinks plus the most recent entries.

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
https://arxiv.org/abs/2309.17453
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kvpress_mm.compressor import ScoredCompressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.views import LayerView


class StreamingLLM(ScoredCompressor):
    """Keeps the first ``sink_tokens`` and the last ``n_keep - sink_tokens`` entries.

    If ``n_keep <= sink_tokens``, keeps the first ``n_keep``.

    Attributes:
        sink_tokens: entries at the start of the prompt always kept (default 4).

    """

    sink_tokens: int = Field(default=4, ge=0, description="Entries at the start always kept.")

    def score(self, layer: LayerView) -> torch.Tensor:
        """Sinks first (earliest highest), then the others by recency."""
        rank = layer.key_valid.long().cumsum(-1) - 1  # [B, P] index among the row's real entries
        top = 2 * layer.seq_len
        scores = torch.where(rank < self.sink_tokens, top - rank, rank).float()
        return scores[:, None, :].expand(-1, layer.kv_heads, -1)


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``streaming``."""
    register("streaming", StreamingLLM)
