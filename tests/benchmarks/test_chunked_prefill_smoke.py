"""Smoke test of ``python -m benchmarks.chunked_prefill`` at a tiny size: it runs and writes every arm's figures.

Timings are never asserted; KV bytes are (they are exact, not measured by the clock).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.chunked_prefill.cli import main
from benchmarks.chunked_prefill.measure import ARMS

TINY = ["--hidden=64", "--intermediate=128", "--layers=2", "--heads=4", "--kv-heads=2", "--vocab=256"]


def test_tiny_run_writes_every_arm_and_length(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "chunked_prefill.json"
    argv = [*TINY, "--lengths", "256", "512", "--chunk-size=64", "--max-entries=32", "--interval=4", "--ratio=0.8"]
    main([*argv, "--isolation=inline", "--threads=1", "--quiet", "--markdown", f"--out={out}"])
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert list(summary["arms"]) == list(ARMS)
    assert summary["machine"]["kvpress_mm"]
    for arm, data in summary["arms"].items():
        assert arm in printed
        assert [row["length"] for row in data["rows"]] == [256, 512]
        assert set(data["fits"]) >= {"kv_bytes_peak", "kv_bytes_above_result"}
        for row in data["rows"]:
            assert row["kv_bytes_peak"] >= row["kv_bytes_after"] > 0 and row["prefill_s"] > 0
    one_call, chunked, bounded = (summary["arms"][arm]["rows"][-1] for arm in ARMS)
    # same final budget for the first two; the chunks hold one chunk above it, not the prompt
    assert one_call["kv_bytes_after"] == chunked["kv_bytes_after"]
    per_entry = chunked["kv_bytes_after"] / (2 * chunked["n_keep"][0])  # 2 layers
    assert chunked["kv_bytes_above_result"] <= per_entry * 64
    assert one_call["kv_bytes_above_result"] >= per_entry * (512 - chunked["n_keep"][0])
    assert bounded["kv_bytes_peak"] <= per_entry * (2 * 32 + 64)
    assert "| L | arm |" in printed
