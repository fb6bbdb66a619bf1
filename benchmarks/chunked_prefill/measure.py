"""The arms of the chunked-prefill benchmark: one prefill per (arm, prompt length), each in a fresh process."""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.harness.memory import MALLOC_ENV, peak_rss_bytes, reset_peak_rss, rss_bytes, status_kib
from benchmarks.harness.runs import module_command, run_worker

#: The arms: a strategy spec each (wrappers outermost first, ``kvpress_mm.apps.run.compressor_from_spec``).
ARMS: tuple[str, ...] = ("snapkv", "chunked-prefill:snapkv", "decoding:chunked-prefill:snapkv")


@dataclass(frozen=True)
class Config:
    """What one benchmark run measures (model shape, prompts, arms)."""

    lengths: tuple[int, ...] = (4096, 8192, 16384, 32768)
    ratio: float = 0.9
    chunk_size: int = 1024
    max_entries: int = 1024
    interval: int = 64
    arms: tuple[str, ...] = ARMS
    hidden: int = 256
    intermediate: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 8
    vocab: int = 256
    threads: int | None = None
    seed: int = 0

    def to_json(self) -> str:
        """The config as JSON (what a worker process is given)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Config:
        """Inverse of :meth:`to_json`."""
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()}
        return cls(**values)

    def compressor(self, arm: str) -> Any:
        """The strategy of ``arm``, with this run's chunk size and bound."""
        from kvpress_mm.apps.run import compressor_from_spec

        defaults = {
            "chunked-prefill": {"chunk_size": self.chunk_size},
            "decoding": {"max_entries": self.max_entries, "interval": self.interval},
        }
        return compressor_from_spec(arm, self.ratio, defaults=defaults)


def prefill(model: Any, compressor: Any, input_ids: Any) -> tuple[Any, float]:
    """One prefill (``generate`` of one token) under ``compressor``; ``(report, seconds)``."""
    import torch

    start = time.perf_counter()
    with torch.no_grad(), compressor(model) as session:
        model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=1, do_sample=False, top_p=None
        )
    return session.report, time.perf_counter() - start


def worker(config: Config, arm: str, length: int) -> dict[str, Any]:
    """Measure one arm at one length in this process (a fresh one: see :func:`measure_in_process`)."""
    import torch

    from benchmarks.harness.models import never_stop_early, random_llama, random_prompt

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model = never_stop_early(random_llama(config, length + 8, config.seed))
    model.set_attn_implementation("sdpa")
    compressor = config.compressor(arm)
    prefill(model, compressor, random_prompt(config.vocab, min(512, length), config.seed))  # lazy initialisations
    input_ids = random_prompt(config.vocab, length, config.seed)
    gc.collect()
    resettable = reset_peak_rss() and status_kib("VmHWM") is not None
    before = rss_bytes()
    report, seconds = prefill(model, compressor, input_ids)
    peak = peak_rss_bytes() if resettable else None
    return {
        "arm": arm,
        "length": length,
        "prefill_s": seconds,
        "kv_bytes_peak": report.kv_bytes_peak,
        "kv_bytes_after": report.kv_bytes_after,
        "kv_bytes_before": report.kv_bytes_before,
        "n_keep": list(report.n_keep),
        "rss_peak_growth_bytes": None if peak is None else max(0, peak - before),
    }


def measure_in_process(config: Config, arm: str, length: int) -> dict[str, Any]:
    """:func:`worker` in a fresh Python process (``--worker``), with glibc's allocator settings."""
    command = module_command(
        "benchmarks.chunked_prefill",
        "--worker-config",
        config.to_json(),
        "--worker",
        arm,
        "--worker-length",
        str(length),
    )
    out = run_worker(command, f"chunked-prefill worker {arm} L={length}", env={**os.environ, **MALLOC_ENV})
    return dict(json.loads(out.strip().splitlines()[-1]))


def measure(config: Config, isolation: str = "process", log: bool = True) -> list[dict[str, Any]]:
    """Every (arm, length), shortest first: in fresh processes, or all in this one (indicative)."""
    results = []
    for length in sorted(config.lengths):
        for arm in config.arms:
            if log:
                print(f"prefill {arm} L={length} ...", file=sys.stderr, flush=True)
            if isolation == "process":
                results.append(measure_in_process(config, arm, length))
            else:
                results.append(worker(config, arm, length))
    return results
