"""Fidelity metrics: a compressed generation compared with the full cache's, token by token.

All metrics skip the first generated token: it comes from the prefill, which attends to the
whole prompt before any strategy compresses it, so it is the same under every strategy.

- ``top1_agreement``: teacher-forced. The compressed model is fed the full cache's greedy
  continuation; the fraction of steps where its most likely next token is the full cache's.
- ``kl``: teacher-forced. The mean over those steps of ``KL(p_full || p_compressed)`` (nats)
  between the next-token distributions.
- ``greedy_agreement``: free-running. The fraction of positions where the compressed model's
  own greedy continuation has the full cache's token (a continuation drifts once it differs,
  so this is harsher than ``top1_agreement``).
- ``matching_prefix``: free-running. Generated tokens identical to the full cache's before
  the first difference (the first token included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fidelity:
    """How close a compressed generation stays to the full cache's (see the module docstring)."""

    top1_agreement: float
    kl: float
    greedy_agreement: float
    matching_prefix: int


def kl_per_step(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``[steps]`` ``KL(softmax(reference) || softmax(logits))`` in nats, computed in float64."""
    reference = torch.log_softmax(reference_logits.double(), dim=-1)
    other = torch.log_softmax(logits.double(), dim=-1)
    return (reference.exp() * (reference - other)).sum(-1).clamp_min(0.0)


def greedy_agreement(reference: Sequence[int], tokens: Sequence[int]) -> tuple[float, int]:
    """(fraction of positions 2..n equal to the reference's, length of the common prefix)."""
    same = [a == b for a, b in zip(tokens, reference)]
    same += [False] * (len(reference) - len(same))
    prefix = same.index(False) if False in same else len(same)
    decode = same[1:]
    return (sum(decode) / len(decode) if decode else math.nan), prefix


def fidelity(
    reference_tokens: Sequence[int],
    reference_logits: torch.Tensor,
    forced_logits: torch.Tensor,
    free_tokens: Sequence[int],
) -> Fidelity:
    """All metrics of one compressed run against the full cache's.

    Args:
        reference_tokens: the full cache's greedy continuation.
        reference_logits: ``[steps, vocab]`` the full cache's raw logits along it.
        forced_logits: ``[steps, vocab]`` the compressed model's raw logits, teacher-forced
            along ``reference_tokens``.
        free_tokens: the compressed model's own greedy continuation.

    """
    steps = min(len(reference_tokens), reference_logits.shape[0], forced_logits.shape[0])
    if steps >= 2:
        reference = torch.tensor(list(reference_tokens[1:steps]))
        top1 = float((forced_logits[1:steps].argmax(-1) == reference).double().mean())
        kl = float(kl_per_step(reference_logits[1:steps], forced_logits[1:steps]).mean())
    else:
        top1, kl = math.nan, math.nan
    agreement, prefix = greedy_agreement(reference_tokens, free_tokens)
    return Fidelity(top1_agreement=top1, kl=kl, greedy_agreement=agreement, matching_prefix=prefix)
