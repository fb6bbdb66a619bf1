"""Smoke test of ``python -m benchmarks.quantized`` at a tiny size: the bytes it reports, the product check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.quantized.cli import main
from benchmarks.quantized.measure import CACHES
from tests.helpers.quantized import backend_available

TINY = ["--length=256", "--kv-heads=2", "--head-dim=16", "--q-group-size=16", "--residual-length=8", "--dtype=float32"]


def test_tiny_run_reports_the_four_layers_of_every_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "quantized.json"
    main([*TINY, "--ratio=0.75", "--threads=1", "--quiet", f"--out={out}"])
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text() in printed
    assert summary["n_keep"] == 64 and summary["machine"]["torch"]
    full = 2 * 2 * 256 * 16 * 4  # keys + values, 2 KV heads, head_dim 16, float32
    for name in CACHES:
        row = summary["caches"][name]
        if not backend_available(CACHES[name]["backend"]):
            assert "kvpress-mm[quant]" in row["skipped"]
            continue
        measured = row["after_prefill"]["bytes"]
        assert measured["full"] == full and measured["compressed"] * 4 == full
        # quantized: data bits plus two statistics of 4 bytes per group of 16 (fp8: one byte, one scale per tensor)
        per_element = {"quanto-4bit": 0.5 + 0.5, "quanto-2bit": 0.25 + 0.5, "hqq-4bit": 0.5 + 0.5}
        per_element.update({"hqq-8bit": 1 + 0.5, "fp8": 1})
        scales = 8 if name == "fp8" else 0
        assert measured["quantized"] == full / 4 * per_element[name] + scales
        assert measured["both"] == (measured["quantized"] - scales) / 4 + scales
        assert row["after_prefill"]["within_tolerance"]
        if name != "fp8":
            window = row["with_full_residual"]
            assert window["residual_bytes"] == 2 * 2 * 7 * 16 * 4  # residual_length - 1 entries
            assert window["bytes"]["both"] == measured["both"] + window["residual_bytes"]
            assert window["within_tolerance"]
        assert name in printed
    assert summary["all_within_tolerance"]
    assert "PASS" in printed and "MISS" not in printed
