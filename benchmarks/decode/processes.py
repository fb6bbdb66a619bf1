"""Where the decode benchmark's arms run: every arm of one prompt length in one fresh process (or all in this one).

A worker process is ``python -m benchmarks.decode --worker-config ... --worker-arms ... --worker-out F``
(the command line's hidden worker mode): it builds the model, runs :func:`run_group` and writes
the results to ``F``; its progress lines advance the parent's progress bar.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.decode.arms import Arm, Config, groups_of, plan_arms, unique_arms
from benchmarks.decode.decoding import decode_group, decode_rounds
from benchmarks.decode.inputs import build_model
from benchmarks.decode.prefill import derive_growing, prefill_arm
from benchmarks.harness.memory import MALLOC_ENV, set_malloc_thresholds
from benchmarks.harness.runs import CompressionProbe, module_command, report_progress, run_worker

# glibc while prefilling: harness.MALLOC_ENV (allocations above 128 KiB are mmapped and returned on free);
# while decoding, the ceiling of glibc's dynamic threshold (32 MiB on 64-bit): what a long-running process
# converges to, so that a stock cache's per-step torch.cat reuses heap memory as it would in use
DECODE_MMAP_THRESHOLD = 32 * 2**20


def run_group(
    model: Any, config: Config, arms: list[Arm], probe: CompressionProbe | None, progress: Any
) -> dict[str, dict[str, Any]]:
    """Every arm of one prompt length: its prefill (or copy), then interleaved decoding."""
    results: dict[str, dict[str, Any]] = {}
    states: dict[str, dict[str, Any]] = {}
    for arm in arms:
        base = arm.derived_from
        if base is not None and base.key in states:
            results[arm.key], states[arm.key] = derive_growing(model, arm, states[base.key])
        else:
            results[arm.key], states[arm.key] = prefill_arm(model, config, arm, probe)
        progress(f"prefill {arm.key}")
    set_malloc_thresholds(DECODE_MMAP_THRESHOLD, 2 * DECODE_MMAP_THRESHOLD)  # see DECODE_MMAP_THRESHOLD
    decoded = decode_group(model, config, arms, [states.pop(a.key) for a in arms], progress)
    for key, figures in decoded.items():
        results[key].update(figures)
    return results


def worker(config: Config, arms: list[Arm], out: Path) -> None:
    """One prompt length in this (fresh) process; progress lines on stderr, results as JSON in ``out``."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model = build_model(config)
    with CompressionProbe().installed() as probe:
        results = run_group(model, config, arms, probe, report_progress)
    out.write_text(json.dumps(results))


def run_in_process(config: Config, arms: list[Arm], progress: Any) -> dict[str, dict[str, Any]]:
    """:func:`worker` for ``arms`` in a fresh process; its progress lines go to ``progress(text)``."""
    with tempfile.TemporaryDirectory(prefix="kvpress-mm-decode-") as scratch:
        out = Path(scratch) / "results.json"
        command = module_command(
            "benchmarks.decode",
            "--worker-config",
            config.to_json(),
            "--worker-arms",
            json.dumps([asdict(a) for a in arms]),
            "--worker-out",
            str(out),
        )
        what = f"decode worker for L={arms[0].length}"
        run_worker(command, what, env={**os.environ, **MALLOC_ENV}, progress=progress)
        return dict(json.loads(out.read_text()))


def measure(config: Config, isolation: str = "process", progress: bool = True) -> dict[str, dict[str, Any]]:
    """Every arm of the run, keyed by :attr:`Arm.key`: one process (or this one) per prompt length."""
    from tqdm import tqdm

    groups = groups_of(unique_arms(plan_arms(config)))
    total = sum(len(g) for g in groups.values()) + len(groups) * decode_rounds(config)
    results: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=total, desc="decode benchmark", unit="step", disable=not progress, file=sys.stderr)

    def advance(text: str) -> None:
        bar.set_postfix_str(text)
        bar.update()

    try:
        if isolation == "process":
            for arms in groups.values():
                results.update(run_in_process(config, arms, advance))
        else:
            model = build_model(config)
            with CompressionProbe().installed() as probe:
                for arms in groups.values():
                    results.update(run_group(model, config, arms, probe, advance))
    finally:
        bar.close()
    return results
