"""The runs of prefill_decode: every arm's timed ``generate``, interleaved with the no-compressor arm, and
its peak prefill memory (in a fresh process per arm by default)."""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.harness.memory import (
    MALLOC_ENV,
    cache_sizes,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    ru_maxrss_bytes,
    status_kib,
)
from benchmarks.harness.models import never_stop_early, random_llama, random_prompt
from benchmarks.harness.runs import StepTimer, greedy_options, module_command, run_worker
from kvpress_mm.strategies import BUILTIN_STRATEGIES

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NO_COMPRESSOR = "none"
#: Wrappers measured around their papers' usual inner strategy (an arm is a strategy spec: wrappers
#: outermost first, ``kvpress_mm.apps.run.compressor_from_spec``).
WRAPPER_ARMS: tuple[str, ...] = ("pyramid:snapkv", "modality-budget:snapkv", "mixkv:snapkv")
ALL_STRATEGIES = (
    *BUILTIN_STRATEGIES,
    *WRAPPER_ARMS,
)  # every arm but the no-compressor baseline (the tests read this name)


@dataclass
class Config:
    """What one benchmark run measures (model shape, prompt, arms)."""

    length: int = 8192
    ratio: float = 0.8
    decode_tokens: int = 32
    repeats: int = 3
    strategies: tuple[str, ...] = ALL_STRATEGIES
    hidden: int = 512
    intermediate: int = 1536
    layers: int = 8
    heads: int = 8
    kv_heads: int = 2
    vocab: int = 1024
    threads: int | None = None
    memory: str = "subprocess"  # subprocess | inline | off
    seed: int = 0

    @property
    def arms(self) -> tuple[str, ...]:
        """The no-compressor baseline first, then each strategy."""
        return (NO_COMPRESSOR, *self.strategies)


@dataclass
class ArmResult:
    """Everything measured for one arm."""

    arm: str
    prefill_s: list[float] = field(default_factory=list)
    prefill_cpu_s: list[float] = field(default_factory=list)
    decode_ms_per_token: list[float] = field(default_factory=list)
    # each run divided by the mean of the two no-compressor runs around it
    prefill_ratios: list[float] = field(default_factory=list)
    prefill_cpu_ratios: list[float] = field(default_factory=list)
    decode_ratios: list[float] = field(default_factory=list)
    cache_bytes_after_prefill: int | None = None
    kv_bytes_before: int | None = None
    kv_bytes_after: int | None = None
    layers_compressed: int | None = None
    peak_prefill_bytes: int | None = None
    rss_before_prefill_bytes: int | None = None
    memory_method: str | None = None


# -- model and inputs ------------------------------------------------------------------------


def build_model(config: Config) -> PreTrainedModel:
    """The random float32 Llama of ``config`` (sdpa, no EOS so generation never stops early)."""
    model = random_llama(config, config.length + config.decode_tokens + 8, config.seed)
    model.set_attn_implementation("sdpa")
    return never_stop_early(model)


def make_prompt(config: Config, length: int | None = None) -> torch.Tensor:
    """``[1, length]`` random token ids, BOS first, deterministic in ``config.seed``."""
    return random_prompt(config.vocab, config.length if length is None else length, config.seed)


class PrefillTimer(StepTimer):
    """The step timer that also sizes the cache right after the prefill."""

    def __init__(self, cache: Any) -> None:
        super().__init__()
        self.cache = cache
        self.cache_bytes_after_prefill = 0

    def at_prefill_end(self) -> None:
        self.cache_bytes_after_prefill = cache_sizes(self.cache)[0]


@dataclass
class ArmRun:
    """One timed generation of one arm."""

    prefill_s: float
    prefill_cpu_s: float
    decode_step_s: list[float]
    report: Any  # the session's CompressionReport, None without a compressor
    cache_bytes_after_prefill: int


def run_arm(model: PreTrainedModel, config: Config, arm: str, input_ids: torch.Tensor, new_tokens: int) -> ArmRun:
    """Greedy generation of ``new_tokens`` with ``arm``, timed step by step."""
    from transformers import DynamicCache

    from kvpress_mm.apps.run import compressor_from_spec

    cache = DynamicCache(config=model.config)
    timer = PrefillTimer(cache)
    compressor = None if arm == NO_COMPRESSOR else compressor_from_spec(arm, config.ratio)
    _, session = timer.generate(model, input_ids, greedy_options(input_ids, new_tokens, cache=cache), compressor)
    return ArmRun(
        prefill_s=timer.prefill_s,
        prefill_cpu_s=timer.prefill_cpu_s,
        decode_step_s=timer.step_s,
        report=None if session is None else session.report,
        cache_bytes_after_prefill=timer.cache_bytes_after_prefill,
    )


# -- memory ----------------------------------------------------------------------------------


def measure_peak_memory(model: PreTrainedModel, config: Config, arm: str, warmup: bool = True) -> dict[str, Any]:
    """Peak RSS growth of one prefill of ``arm`` in the current process (best in a fresh one)."""
    if warmup:  # lazy initialisations on a short prompt, not the measured peak
        run_arm(model, config, arm, make_prompt(config, min(64, config.length)), 1)
    input_ids = make_prompt(config)
    gc.collect()
    if reset_peak_rss() and status_kib("VmHWM") is not None:
        method = "VmHWM after clear_refs"
        before = rss_bytes()
        run_arm(model, config, arm, input_ids, 1)
        peak = peak_rss_bytes()
    else:  # no resettable high-water mark: the process's lifetime peak (model build included)
        method = "ru_maxrss"
        before = ru_maxrss_bytes()
        run_arm(model, config, arm, input_ids, 1)
        peak = ru_maxrss_bytes()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        method += f", MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
    return {"peak_prefill_bytes": max(0, peak - before), "rss_before_prefill_bytes": before, "memory_method": method}


def worker_args(config: Config) -> list[str]:
    """Command-line arguments that rebuild ``config``'s model, prompt and arm settings in a worker."""
    args = [
        f"--length={config.length}",
        f"--ratio={config.ratio}",
        f"--decode-tokens={config.decode_tokens}",
        f"--hidden={config.hidden}",
        f"--intermediate={config.intermediate}",
        f"--layers={config.layers}",
        f"--heads={config.heads}",
        f"--kv-heads={config.kv_heads}",
        f"--vocab={config.vocab}",
        f"--seed={config.seed}",
    ]
    if config.threads is not None:
        args.append(f"--threads={config.threads}")
    return args


def measure_memory_in_subprocess(config: Config, arm: str) -> dict[str, Any]:
    """Run :func:`measure_peak_memory` for ``arm`` in a fresh Python process (``--memory-worker``)."""
    command = module_command("benchmarks.prefill_decode", *worker_args(config), f"--memory-worker={arm}")
    out = run_worker(command, f"memory worker for {arm!r}", env={**os.environ, **MALLOC_ENV})
    return dict(json.loads(out.strip().splitlines()[-1]))


# -- the run ---------------------------------------------------------------------------------


def measure(config: Config, log: bool = True) -> dict[str, ArmResult]:
    """Time every arm (interleaved, repeated), then measure memory; one :class:`ArmResult` per arm."""
    results = {arm: ArmResult(arm) for arm in config.arms}
    model = build_model(config)
    input_ids = make_prompt(config)
    arms = list(config.arms)
    if log:
        print(f"warm-up ({len(arms)} arms, short prompt) ...", file=sys.stderr, flush=True)
    for arm in arms:
        run_arm(model, config, arm, make_prompt(config, min(128, config.length)), 2)
    strategies = list(config.strategies)

    def timed(arm: str, repeat: int) -> ArmRun:
        run = run_arm(model, config, arm, input_ids, config.decode_tokens)
        result = results[arm]
        result.prefill_s.append(run.prefill_s)
        result.prefill_cpu_s.append(run.prefill_cpu_s)
        if run.decode_step_s:
            result.decode_ms_per_token.append(1000 * statistics.mean(run.decode_step_s))
        result.cache_bytes_after_prefill = run.cache_bytes_after_prefill
        if run.report is not None:
            result.kv_bytes_before = run.report.kv_bytes_before
            result.kv_bytes_after = run.report.kv_bytes_after
            result.layers_compressed = run.report.layers_compressed
        if log:
            print(
                f"repeat {repeat + 1}/{config.repeats} {arm:>22}: prefill {run.prefill_s:8.3f} s "
                f"(cpu {run.prefill_cpu_s:8.3f} s)",
                file=sys.stderr,
                flush=True,
            )
        return run

    for repeat in range(config.repeats):
        # none, s1, none, s2, ..., none: every strategy run sits between two no-compressor runs,
        # so its ratios hold even when the machine's load drifts; the order rotates per repeat
        shift = repeat % max(1, len(strategies))
        before = timed(NO_COMPRESSOR, repeat)
        for arm in strategies[shift:] + strategies[:shift]:
            run = timed(arm, repeat)
            after = timed(NO_COMPRESSOR, repeat)
            result = results[arm]
            result.prefill_ratios.append(run.prefill_s / statistics.mean([before.prefill_s, after.prefill_s]))
            result.prefill_cpu_ratios.append(
                run.prefill_cpu_s / statistics.mean([before.prefill_cpu_s, after.prefill_cpu_s])
            )
            base_steps = before.decode_step_s + after.decode_step_s
            if run.decode_step_s and base_steps:
                result.decode_ratios.append(statistics.mean(run.decode_step_s) / statistics.mean(base_steps))
            before = after
    if config.memory != "off":
        for arm in arms:
            if log:
                print(f"peak memory ({config.memory}) {arm} ...", file=sys.stderr, flush=True)
            if config.memory == "subprocess":
                memory = measure_memory_in_subprocess(config, arm)
            else:
                memory = measure_peak_memory(model, config, arm, warmup=False)  # warmed up above
            result = results[arm]
            result.peak_prefill_bytes = memory["peak_prefill_bytes"]
            result.rss_before_prefill_bytes = memory["rss_before_prefill_bytes"]
            result.memory_method = memory["memory_method"]
    return results
