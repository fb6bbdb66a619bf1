"""Greedy generation under a strategy, measured: tokens, raw logits, KV bytes and decode time.

One function, :func:`generate`, serves ``run``, ``demo``, ``bench fidelity`` and ``eval``. It
calls ``model.generate`` (so positions, masks and the cache follow exactly the path users
take) inside the strategy's context manager, and can teacher-force a given continuation: a
logits processor makes greedy decoding pick the given token at each step, while the raw
logits (before any processor) are recorded, so the compressed model's next-token
distributions can be compared with the full cache's along the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpress_mm.cache.surgery import kv_bytes
from kvpress_mm.compressor import Compressor
from kvpress_mm.session import CompressionReport


@dataclass
class GenerationResult:
    """One greedy generation and what it cost.

    Attributes:
        tokens: the generated token ids (the prompt excluded).
        prompt_length: tokens in the prompt.
        kv_bytes_before: KV-cache bytes of the prompt before compression.
        kv_bytes_after: KV-cache bytes of the prompt after compression (``kv_bytes_before``
            when nothing was compressed).
        kv_bytes_end: KV-cache bytes when generation ended.
        decode_ms_per_token: mean wall time of a decode step (the first token comes from the
            prefill and is not counted); ``nan`` with fewer than 2 tokens.
        prefill_ms: wall time from the call to the first token.
        logits: ``[steps, vocab]`` float32 raw logits, when requested.
        report: the compressor session's report (``None`` without a compressor).

    """

    tokens: list[int]
    prompt_length: int
    kv_bytes_before: int
    kv_bytes_after: int
    kv_bytes_end: int
    decode_ms_per_token: float
    prefill_ms: float
    logits: torch.Tensor | None = field(default=None, repr=False)
    report: CompressionReport | None = field(default=None, repr=False)

    @property
    def kept_fraction(self) -> float:
        """``kv_bytes_after / kv_bytes_before``."""
        return self.kv_bytes_after / self.kv_bytes_before if self.kv_bytes_before else 1.0


class _StepClock:
    """A stopping criterion that never stops: it records when each token was produced."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def ms_per_decode_step(self) -> float:
        if len(self.times) < 2:
            return float("nan")
        return 1000 * (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    def prefill_ms(self) -> float:
        return 1000 * (self.times[0] - self.start) if self.times else float("nan")


class _ForceTokens:
    """A logits processor that makes greedy decoding pick ``tokens[step]`` at each step."""

    def __init__(self, tokens: Sequence[int], prompt_length: int) -> None:
        self.tokens = list(tokens)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[step]] = 0.0
        return forced


def _cache_of(output: Any) -> Any:
    return getattr(output, "cache", None)


def _cache_layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", None) or [])


def _prompt_bytes(cache: Any, prompt_length: int) -> int:
    """KV bytes of ``prompt_length`` entries per layer, from an uncompressed cache's entry size."""
    total = 0
    for layer in _cache_layers(cache):
        entries = int(layer.get_seq_length()) if hasattr(layer, "get_seq_length") else 0  # quantized layers too
        if entries > 0:
            total += kv_bytes(layer) * prompt_length // entries
    return total


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    max_new_tokens: int,
    compressor: Compressor | None = None,
    *,
    forced_tokens: Sequence[int] | None = None,
    keep_logits: bool = False,
    stop_at_eos: bool = False,
) -> GenerationResult:
    """Greedy ``model.generate`` on a batch of one, under ``compressor`` when given.

    Args:
        model: a transformers generative model.
        inputs: its inputs (``input_ids``, ``attention_mask``, ``pixel_values``...).
        max_new_tokens: tokens to generate.
        compressor: the strategy; ``None`` runs the full cache.
        forced_tokens: teacher forcing: the tokens to pick at each step (at least
            ``max_new_tokens`` of them).
        keep_logits: record the raw logits of every step.
        stop_at_eos: stop at the model's end-of-sequence token; otherwise exactly
            ``max_new_tokens`` tokens are generated (end-of-sequence suppressed), as
            comparisons between strategies need.

    """
    from transformers import LogitsProcessorList, StoppingCriteriaList

    prompt_length = int(inputs["input_ids"].shape[1])
    clock = _StepClock()
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "num_beams": 1,
        "return_dict_in_generate": True,
        "output_logits": keep_logits,
        "stopping_criteria": StoppingCriteriaList([clock]),
    }
    # generation configs of real checkpoints may carry sampling settings: greedy ignores them
    options.update(temperature=None, top_p=None, top_k=None)
    if not stop_at_eos:
        options["min_new_tokens"] = max_new_tokens
    if forced_tokens is not None:
        if len(forced_tokens) < max_new_tokens:
            raise ValueError(f"teacher forcing needs {max_new_tokens} tokens, got {len(forced_tokens)}")
        options["logits_processor"] = LogitsProcessorList([_ForceTokens(forced_tokens, prompt_length)])
    generate_fn: Any = model.generate
    report: CompressionReport | None = None
    if compressor is None:
        clock.start = time.perf_counter()
        output = generate_fn(**inputs, **options)
    else:
        with compressor(model) as session:
            clock.start = time.perf_counter()
            output = generate_fn(**inputs, **options)
        report = session.report
    tokens = output.sequences[0, prompt_length:].tolist()
    cache = _cache_of(output)
    end_bytes = sum(kv_bytes(layer) for layer in _cache_layers(cache))
    if report is not None and report.layers_compressed > 0:
        before, after = report.kv_bytes_before, report.kv_bytes_after
    else:
        before = after = _prompt_bytes(cache, prompt_length)
    logits = None
    if keep_logits and output.logits:
        logits = torch.stack([step[0] for step in output.logits]).float().cpu()
    return GenerationResult(
        tokens=tokens,
        prompt_length=prompt_length,
        kv_bytes_before=before,
        kv_bytes_after=after,
        kv_bytes_end=end_bytes,
        decode_ms_per_token=clock.ms_per_decode_step(),
        prefill_ms=clock.prefill_ms(),
        logits=logits,
        report=report,
    )
