"""Teacher forcing through ``generate``: the independent reference for beam search scores.

Each beam that beam search returns is rescored by a greedy run forced to produce that beam's
tokens, on a batch with no reordering at all; the log-probabilities it computes must sum to
the beam's score.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class ForceTokens(LogitsProcessor):
    """Greedy decoding forced to produce ``tokens [B, T]`` (teacher forcing through generate)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, self.tokens[:, self.step : self.step + 1], 0.0)
        self.step += 1
        return forced


def teacher_forced_log_probs(logits: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
    """``[B]`` summed log-probabilities of ``tokens [B, T]`` under the raw step ``logits``."""
    steps = [step.float().log_softmax(-1).gather(1, tokens[:, t : t + 1])[:, 0] for t, step in enumerate(logits)]
    return torch.stack(steps, dim=1).sum(1)
