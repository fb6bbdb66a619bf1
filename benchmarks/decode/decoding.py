"""The decoding of the decode benchmark: every arm of one prompt length, interleaved step by step."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.decode.arms import Arm, Config
from benchmarks.harness.memory import cache_sizes, peak_rss_bytes, release_free_memory, reset_peak_rss, rss_bytes
from benchmarks.harness.runs import compression_context


@dataclass
class Decoder:
    """One arm's cache and where its greedy continuation stands."""

    arm: Arm
    cache: Any
    token: torch.Tensor  # [1, 1] the next input token
    position: int  # its absolute position (= mask columns seen so far)
    step_ms: list[float]
    peak_growth: int = 0

    def run(self, model: Any, steps: int, timed: bool) -> None:
        """``steps`` greedy decode steps (a manual loop with absolute positions and the full mask)."""
        context = compression_context(self.arm.compressor(), model, growing_cache=self.arm.cache == "growing")
        if timed:
            reset_peak_rss()
        before = rss_bytes()
        with context, torch.inference_mode():
            for _ in range(steps):
                start = time.perf_counter()
                out = model(
                    input_ids=self.token,
                    attention_mask=torch.ones(1, self.position + 1, dtype=torch.long),
                    position_ids=torch.tensor([[self.position]]),
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                self.token = out.logits[:, -1:].argmax(-1)
                elapsed = time.perf_counter() - start
                self.position += 1
                if timed:
                    self.step_ms.append(1000 * elapsed)
        if timed:
            self.peak_growth = max(self.peak_growth, peak_rss_bytes() - before)


def decode_rounds(config: Config) -> int:
    """Turns each arm takes to decode ``config.decode_tokens`` tokens."""
    burst = max(1, min(config.decode_burst, config.decode_tokens))
    return -(-config.decode_tokens // burst)


def decode_group(
    model: Any,
    config: Config,
    arms: list[Arm],
    states: list[dict[str, Any]],
    progress: Any = None,
) -> dict[str, dict[str, Any]]:
    """Decode ``config.decode_tokens`` tokens for every arm, interleaved in bursts, in a rotating order.

    All arms of one prompt length decode in one process, a burst of steps each in turn, so that
    their ms/token are measured under the same conditions (other load on the machine varies).
    ``progress(text)`` is called after each round.
    """
    decoders = [Decoder(arm, s["cache"], s["next_token"], s["position"], []) for arm, s in zip(arms, states)]
    for decoder in decoders:  # warm-up: lazy initialisations, untimed
        decoder.run(model, 2, timed=False)
    release_free_memory()
    burst = max(1, min(config.decode_burst, config.decode_tokens))
    rounds = decode_rounds(config)
    for index in range(rounds):
        shift = index % len(decoders)
        for decoder in decoders[shift:] + decoders[:shift]:
            decoder.run(model, min(burst, config.decode_tokens - len(decoder.step_ms)), timed=True)
        if progress is not None:
            progress(f"decode L={arms[0].length}: {len(arms)} arms, round {index + 1}/{rounds}")
    return {
        d.arm.key: {
            "decode_step_ms": d.step_ms,
            "decode_ms_per_token": statistics.median(d.step_ms) if d.step_ms else None,
            "decode_ms_mean": statistics.fmean(d.step_ms) if d.step_ms else None,
            "decode_peak_growth": d.peak_growth,
            "kv_bytes_after_decode": cache_sizes(d.cache)[0],
        }
        for d in decoders
    }
