"""Smoke test of ``python -m benchmarks.prefill_decode`` at a tiny size: it runs, and writes every arm's figures.

Timings are never asserted (they are what the benchmark measures, not what it checks).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.prefill_decode.cli import config_from_args, main, parse_args
from benchmarks.prefill_decode.measure import ALL_STRATEGIES, worker_args

TINY = [
    "--hidden=64",
    "--intermediate=128",
    "--layers=2",
    "--heads=4",
    "--kv-heads=2",
    "--vocab=256",
    "--length=256",
    "--ratio=0.8",
]


def test_tiny_run_writes_every_arm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results" / "prefill_decode.json"
    argv = [*TINY, "--decode-tokens=2", "--repeats=1", "--memory=inline", "--threads=1", "--quiet", f"--out={out}"]
    main(argv)
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())

    arms = summary["arms"]
    assert list(arms) == ["none", *ALL_STRATEGIES]
    assert summary["config"]["length"] == 256
    assert summary["machine"]["torch"] and summary["machine"]["torch_threads"] == 1
    for name, row in arms.items():
        assert name in printed
        # one run per strategy, and a no-compressor run before and after each of them
        runs = len(ALL_STRATEGIES) + 1 if name == "none" else 1
        assert len(row["prefill_s"]) == runs and min(row["prefill_s"]) > 0, name
        assert len(row["decode_ms_per_token"]) == runs and min(row["decode_ms_per_token"]) > 0, name
        assert row["peak_prefill_bytes"] is not None and row["peak_prefill_bytes"] >= 0, name
        if name != "none":
            assert len(row["prefill_ratios"]) == len(row["decode_ratios"]) == 1, name
            assert row["prefill_ratio"] == row["prefill_ratios"][0] > 0, name
            assert "prefill_ratio" in row["targets"], name

    # the uncompressed arms hold the whole prompt: layers x (keys + values) x kv_heads x L x head_dim x 4 bytes
    full_bytes = 2 * 2 * 2 * 256 * 16 * 4
    assert arms["none"]["cache_bytes_after_prefill"] == full_bytes
    assert arms["full"]["cache_bytes_after_prefill"] == full_bytes

    # KV bytes after = (1 - r) x before, up to the integer budget: n_keep = int(256 * 0.2) = 51
    n_keep = int(256 * (1 - 0.8))
    for name in ALL_STRATEGIES:
        if name == "full":
            continue
        row = arms[name]
        assert row["kv_bytes_before"] == full_bytes, name
        assert row["kv_bytes_after"] * 256 == row["kv_bytes_before"] * n_keep, name
        assert row["cache_bytes_after_prefill"] == row["kv_bytes_after"], name
        assert abs(row["kv_kept_error_pct"]) <= 1.0, name
        assert row["targets"]["kv_bytes"]["met"], name
    assert "PASS" in printed


def test_memory_worker_rebuilds_the_same_run(capsys: pytest.CaptureFixture[str]) -> None:
    # the full-size run measures peak memory in a fresh process per arm, started with these arguments
    config = config_from_args(parse_args([*TINY, "--decode-tokens=2", "--threads=1"]))
    argv = worker_args(config)
    rebuilt = config_from_args(parse_args(argv))
    assert replace(rebuilt, repeats=config.repeats, strategies=config.strategies, memory=config.memory) == config
    main([*argv, "--memory-worker=h2o"])  # what the worker process runs
    memory = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert memory["peak_prefill_bytes"] >= 0
    assert memory["rss_before_prefill_bytes"] > 0
    assert memory["memory_method"] in ("VmHWM after clear_refs", "ru_maxrss")
