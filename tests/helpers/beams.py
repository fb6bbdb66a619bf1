"""Teacher forcing through ``generate``: the independent reference for beam search scores.

Each beam that beam search returns is rescored by a greedy run forced to produce that beam's
tokens, on a batch with no reordering at all; the log-probabilities it computes must sum to
the beam's score.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from tests.helpers.tiny_models import generate


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


def assert_forced_run_matches(out: Any, forced: Any, tokens: torch.Tensor, atol: float = 1e-4) -> None:
    """``forced`` (a run forced to ``tokens``) gave ``out``'s beams; its log-probabilities sum to their scores."""
    assert torch.equal(forced.sequences, out.sequences)
    difference = (teacher_forced_log_probs(forced.logits, tokens) - out.sequences_scores).abs().max().item()
    assert difference < atol, difference


def assert_beams_rescored_by_forcing(
    model: Any,
    compressor: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    out: Any,
    beams: int,
    new_tokens: int,
    atol: float = 1e-4,
) -> None:
    """Rescore every beam of ``out`` (a text model's beam search on ``ids``) by a forced run under ``compressor``.

    The forced run repeats each prompt row ``beams`` times, as beam search lays out its rows, and
    has no reordering at all.
    """
    tokens = out.sequences[:, ids.shape[1] :]
    with compressor(model):
        forced = generate(
            model,
            ids.repeat_interleave(beams, 0),
            mask.repeat_interleave(beams, 0),
            max_new_tokens=new_tokens,
            logits_processor=LogitsProcessorList([ForceTokens(tokens)]),
        )
    assert_forced_run_matches(out, forced, tokens, atol)
