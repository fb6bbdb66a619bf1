"""Prefill overhead, peak memory, KV bytes and decode speed of every strategy on a random text model.

A benchmark, not a test: it measures and reports, it never fails on timings. Run it as

    .venv/bin/python benchmarks/prefill_decode.py [--length 8192 --ratio 0.8 --decode-tokens 32 --repeats 3]

The model is a random ``LlamaForCausalLM`` built from a config (no downloads): hidden 512,
MLP 1536 (3 x hidden), 8 layers, 8 query heads, 2 KV heads (head_dim 64), vocabulary 1024 (so
the LM head does not dominate), float32, ``sdpa``. Every *arm* (``none`` = no compressor, then each strategy) runs
the same greedy ``generate`` on the same random prompt:

- prefill time and decode ms/token are read from a logits processor that timestamps each
  generation step (the first call comes right after the prefill forward). Every strategy run
  sits between two runs without compressor (``none, s1, none, s2, ..., none``, the order
  rotating per repeat); its ratios are taken against the mean of those two neighbours, and
  the median over repeats is reported, so the ratios hold on a shared machine whose load
  drifts. Process CPU times are paired the same way (``cpu ratio``, for information: with one
  thread it is nearly immune to other load; with several, threads waiting at barriers count);
- peak memory is the resident-set high-water mark of the prefill, measured in a fresh process
  per arm (torch CPU allocations are invisible to ``tracemalloc``), with glibc's mmap threshold
  fixed at 128 KiB so that freed tensors leave the resident set: after building the model
  and a short warm-up, the kernel's high-water mark is reset (``/proc/self/clear_refs``) and
  the prefill's peak RSS minus the RSS just before it is reported;
- KV bytes before/after come from ``session.report``; the cache is also measured directly
  right after the prefill (for the ``none`` and ``full`` arms too).

Results are printed as a table (with PASS/MISS per target) and written as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from bench_common import (
    BOS,
    MALLOC_ENV,
    add_model_arguments,
    fmt,
    greedy_options,
    llama_config,
    machine_info,
    median_or_none,
    model_shape_kwargs,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    ru_maxrss_bytes,
    status_kib,
)

from kvpress_mm.strategies import BUILTIN_STRATEGIES

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NO_COMPRESSOR = "none"
ALL_STRATEGIES = BUILTIN_STRATEGIES  # every arm but the no-compressor baseline (the tests read this name)
# Targets of the spec: prefill time ratio (strategy / no compressor) per strategy.
PREFILL_TARGETS = {
    "full": 1.05,  # not in the spec: a no-op strategy is held to the cheap strategies' bound
    "random": 1.05,
    "streaming": 1.05,
    "snapkv": 1.05,
    "h2o": 1.3,
    "lookm-evict": 1.3,
    "lookm-average": 1.3,
    "lookm-pivotal": 1.3,
    "lookm-weighted": 1.3,
}
MEMORY_TARGET = 1.10  # peak prefill memory (strategy) / peak prefill memory (no compressor)
KV_BYTES_TOLERANCE = 0.01  # |after / before - (1 - r)| / (1 - r)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "prefill_decode.json"


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
    import transformers

    model_config = llama_config(config, config.length + config.decode_tokens + 8)
    torch.manual_seed(config.seed)
    model = transformers.LlamaForCausalLM(model_config).float().eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_prompt(config: Config, length: int | None = None) -> torch.Tensor:
    """``[1, length]`` random token ids, BOS first, deterministic in ``config.seed``."""
    length = config.length if length is None else length
    generator = torch.Generator().manual_seed(1000 + config.seed)
    ids = torch.randint(3, config.vocab, (1, length), generator=generator)
    ids[0, 0] = BOS
    return ids


def cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers cache's keys and values."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class StepTimer:
    """A logits processor that timestamps every generation step (and sizes the cache after prefill).

    ``generate`` calls it once per forward pass, right after the logits: the first call ends the
    prefill, each later call ends one decode step.
    """

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.stamps: list[float] = []
        self.cpu_after_prefill = 0.0
        self.cache_bytes_after_prefill = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1:
            self.cpu_after_prefill = time.process_time()
            self.cache_bytes_after_prefill = cache_bytes(self.cache)
        return scores


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

    from kvpress_mm import Compressor

    cache = DynamicCache(config=model.config)
    timer = StepTimer(cache)
    options = greedy_options(input_ids, new_tokens, cache, timer)
    report = None
    with torch.inference_mode():
        cpu_start = time.process_time()
        start = time.perf_counter()
        if arm == NO_COMPRESSOR:
            model.generate(input_ids, **options)  # type: ignore[operator]
        else:
            compressor = Compressor.from_name(arm, compression_ratio=config.ratio)
            with compressor(model) as session:
                model.generate(input_ids, **options)  # type: ignore[operator]
            report = session.report
    steps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
    return ArmRun(
        prefill_s=timer.stamps[0] - start,
        prefill_cpu_s=timer.cpu_after_prefill - cpu_start,
        decode_step_s=steps,
        report=report,
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
    """Run :func:`measure_peak_memory` for ``arm`` in a fresh Python process."""
    command = [sys.executable, str(Path(__file__).resolve()), *worker_args(config), f"--memory-worker={arm}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, **MALLOC_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {arm!r} failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


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
                f"repeat {repeat + 1}/{config.repeats} {arm:>15}: prefill {run.prefill_s:8.3f} s "
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


def summarize(config: Config, results: dict[str, ArmResult]) -> dict[str, Any]:
    """Medians, ratios to the no-compressor arm, and the targets met or missed."""
    base_peak = results[NO_COMPRESSOR].peak_prefill_bytes
    arms: dict[str, Any] = {}
    for arm, result in results.items():
        baseline = arm == NO_COMPRESSOR
        row: dict[str, Any] = {
            **asdict(result),
            "prefill_s_median": median_or_none(result.prefill_s),
            "prefill_ratio": 1.0 if baseline else median_or_none(result.prefill_ratios),
            "prefill_cpu_s_median": median_or_none(result.prefill_cpu_s),
            "prefill_cpu_ratio": 1.0 if baseline else median_or_none(result.prefill_cpu_ratios),
            "decode_ms_per_token_median": median_or_none(result.decode_ms_per_token),
            "decode_ratio": 1.0 if baseline else median_or_none(result.decode_ratios),
            "peak_memory_ratio": (
                result.peak_prefill_bytes / base_peak if result.peak_prefill_bytes is not None and base_peak else None
            ),
            "kv_kept_fraction": None,
            "kv_kept_error_pct": None,
            "targets": {},
        }
        if result.kv_bytes_before:
            kept = (result.kv_bytes_after or 0) / result.kv_bytes_before
            row["kv_kept_fraction"] = kept
            row["kv_kept_error_pct"] = 100 * (kept - (1 - config.ratio)) / (1 - config.ratio)
        if arm != NO_COMPRESSOR:
            targets = row["targets"]
            bound = PREFILL_TARGETS.get(arm)
            if bound is not None and row["prefill_ratio"] is not None:
                targets["prefill_ratio"] = {"max": bound, "met": row["prefill_ratio"] <= bound}
            if row["peak_memory_ratio"] is not None:
                targets["peak_memory_ratio"] = {"max": MEMORY_TARGET, "met": row["peak_memory_ratio"] <= MEMORY_TARGET}
            if arm != "full":
                error = row["kv_kept_error_pct"]
                targets["kv_bytes"] = {
                    "max_error_pct": 100 * KV_BYTES_TOLERANCE,
                    "met": error is not None and abs(error) <= 100 * KV_BYTES_TOLERANCE,
                }
        arms[arm] = row
    return {
        "benchmark": "prefill_decode",
        "config": {**asdict(config), "strategies": list(config.strategies)},
        "machine": machine_info(interop_threads=True),
        "targets": {
            "prefill_ratio_max": PREFILL_TARGETS,
            "peak_memory_ratio_max": MEMORY_TARGET,
            "kv_bytes_relative_error_max": KV_BYTES_TOLERANCE,
        },
        "arms": arms,
        "all_targets_met": all(t["met"] for row in arms.values() for t in row["targets"].values()),
    }


def _verdict(row: dict[str, Any], target: str) -> str:
    entry = row["targets"].get(target)
    if entry is None:
        return ""
    return "PASS" if entry["met"] else "MISS"


def format_table(summary: dict[str, Any]) -> str:
    """The human-readable table of a :func:`summarize` result."""
    config = summary["config"]
    machine = summary["machine"]
    mib = 2**20
    lines = [
        f"prefill_decode: L={config['length']}, r={config['ratio']}, {config['decode_tokens']} decode tokens, "
        f"{config['repeats']} repeats (median); Llama hidden {config['hidden']}, {config['layers']} layers, "
        f"{config['heads']} heads / {config['kv_heads']} KV heads, vocab {config['vocab']}, float32, sdpa",
        f"torch {machine['torch']}, transformers {machine['transformers']}, {machine['torch_threads']} threads, "
        f"{machine['cpu_count']} CPUs, load average at the end {machine['load_average']}",
        "",
    ]
    header = (
        f"{'arm':<15} {'prefill s':>9} {'ratio':>6} {'target':>6} {'':4} {'cpu ratio':>9} "
        f"{'peak MiB':>8} {'ratio':>6} {'':4} {'KV MiB before':>13} {'after':>7} {'kept':>7} {'err %':>7} {'':4} "
        f"{'decode ms/tok':>13} {'ratio':>6}"
    )
    lines += [header, "-" * len(header)]
    for arm, row in summary["arms"].items():
        target = row["targets"].get("prefill_ratio", {}).get("max")
        compressed = bool(row["kv_bytes_before"])
        before = row["kv_bytes_before"] if compressed else row["cache_bytes_after_prefill"]
        after = row["kv_bytes_after"] if compressed else row["cache_bytes_after_prefill"]
        peak = row["peak_prefill_bytes"]
        lines.append(
            f"{arm:<15} {fmt(row['prefill_s_median'], '9.3f')} {fmt(row['prefill_ratio'], '6.3f')} "
            f"{fmt(target, '6.2f')} {_verdict(row, 'prefill_ratio'):4} {fmt(row['prefill_cpu_ratio'], '9.3f')} "
            f"{fmt(None if peak is None else peak / mib, '8.1f')} {fmt(row['peak_memory_ratio'], '6.3f')} "
            f"{_verdict(row, 'peak_memory_ratio'):4} "
            f"{fmt(None if before is None else before / mib, '13.2f')} "
            f"{fmt(None if after is None else after / mib, '7.2f')} {fmt(row['kv_kept_fraction'], '7.4f')} "
            f"{fmt(row['kv_kept_error_pct'], '+7.3f')} {_verdict(row, 'kv_bytes'):4} "
            f"{fmt(row['decode_ms_per_token_median'], '13.2f')} {fmt(row['decode_ratio'], '6.3f')}"
        )
    met = sum(t["met"] for row in summary["arms"].values() for t in row["targets"].values())
    total = sum(len(row["targets"]) for row in summary["arms"].values())
    lines += [
        "",
        f"prefill s = median wall time; ratio = arm / mean of the two '{NO_COMPRESSOR}' (no compressor) runs around "
        "it, median over repeats (decode ratio likewise); cpu ratio = the same with process CPU time, for information.",
        f"peak = RSS high-water growth of one prefill ({config['memory']}); target ratio <= {MEMORY_TARGET}.",
        f"KV MiB from session.report (the cache right after prefill for uncompressed arms); kept = after / before, "
        f"err = its deviation from 1 - r = {1 - config['ratio']:.4g} (target within {100 * KV_BYTES_TOLERANCE:g}%).",
        f"targets met: {met}/{total}",
    ]
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--length", type=int, default=defaults.length, help="prompt tokens")
    parser.add_argument("--ratio", type=float, default=defaults.ratio, help="compression ratio r")
    parser.add_argument("--decode-tokens", type=int, default=defaults.decode_tokens, help="greedy tokens generated")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed runs of every arm (median)")
    parser.add_argument(
        "--strategies", nargs="+", default=list(defaults.strategies), help="strategies to compare with no compressor"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--memory",
        choices=("subprocess", "inline", "off"),
        default=defaults.memory,
        help="peak memory: a fresh process per arm (honest), in this process (fast, indicative), or not at all",
    )
    add_model_arguments(parser, defaults)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    """A :class:`Config` from parsed arguments (unknown strategies fail early)."""
    from kvpress_mm import Compressor

    for name in args.strategies:
        Compressor.from_name(name)  # raises with the available names
    return Config(
        length=args.length,
        ratio=args.ratio,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        strategies=tuple(args.strategies),
        **model_shape_kwargs(args),
        threads=args.threads,
        memory=args.memory,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON; returns the summary."""
    args = parse_args(argv)
    config = config_from_args(args)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if args.memory_worker is not None:
        model = build_model(config)
        print(json.dumps(measure_peak_memory(model, config, args.memory_worker)))
        return {}
    summary = summarize(config, measure(config, log=not args.quiet))
    print(format_table(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwritten: {args.out}")
    return summary


if __name__ == "__main__":
    main()
