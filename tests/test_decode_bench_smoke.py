"""Smoke tests of benchmarks/decode.py and benchmarks/kvpress_compare.py at a tiny size.

They run, measure every arm and write what they promise; timings are never asserted (they are
what the benchmarks measure, not what they check). The kvpress side of the comparison needs
benchmarks/.kvpress-venv (bash benchmarks/setup_kvpress_env.sh) and is skipped without it; the
kvpress-mm side runs either way.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kvpress_mm.budget import n_keep_for
from kvpress_mm.session import GROWING_HEADROOM

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY_MODEL = ["--hidden=64", "--intermediate=128", "--layers=2", "--heads=4", "--kv-heads=4", "--vocab=256"]
# keys and values of one entry in every layer: 2 layers x 2 x 4 KV heads x head_dim 16 x 4 bytes
ENTRY_BYTES = 2 * 2 * 4 * 16 * 4


def _load(name: str) -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # kvpress_compare imports decode as a sibling module
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def decode() -> ModuleType:
    return _load("decode")


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    return _load("kvpress_compare")


def test_tiny_decode_run_reports_every_part(
    decode: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "decode.json"
    argv = [
        *TINY_MODEL,
        "--image-tokens=16",
        "--grid-length=200",
        "--grid-ratios=0.5,0.8",
        "--grid-strategies",
        "streaming",
        "h2o",
        "--sweep-lengths=100,200",
        "--sweep-strategies",
        "lookm-pivotal",
        "--cache-length=200",
        "--decode-tokens=3",
        "--threads=1",
        "--isolation=inline",
        "--quiet",
        f"--out={out}",
    ]
    decode.main(argv)
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    for part in ("GRID", "LENGTH SWEEP", "CACHE ARMS", "native-K target"):
        assert part in printed
    assert (tmp_path / "decode.png").stat().st_size > 0

    # every arm was prefilled and decoded
    for key, arm in summary["arms"].items():
        assert arm["prefill_s"] and arm["prefill_s"][0] > 0, key
        assert len(arm["decode_step_ms"]) == 3, key
        assert arm["decode_ms_per_token"] > 0, key
        assert arm["prefill_peak_growth"] >= 0, key

    # the grid: full once, then every strategy at every ratio; compression measured directly
    grid = summary["grid"]
    assert [(r["strategy"], r["ratio"]) for r in grid] == [
        ("full", 0.0),
        ("streaming", 0.5),
        ("streaming", 0.8),
        ("h2o", 0.5),
        ("h2o", 0.8),
    ]
    for row in grid[1:]:
        assert row["compression_s"] is not None and row["compression_s"] > 0
        assert row["overhead_direct"] is not None and row["overhead_direct"] >= 1
        assert row["compression_peak_mib"] is not None
        assert row["cache_layer_types"] == ["GrowingLayer"]
        # the cache holds n_keep entries, plus the growing layers' headroom allocated
        n_keep = n_keep_for(200, row["ratio"])
        assert row["kv_mib"] * 2**20 == n_keep * ENTRY_BYTES
        assert row["kv_allocated_mib"] * 2**20 == (n_keep + GROWING_HEADROOM) * ENTRY_BYTES
    assert grid[0]["kv_mib"] * 2**20 == 200 * ENTRY_BYTES and grid[0]["cache_layer_types"] == ["DynamicLayer"]

    # the sweep: native-K is a prompt of K = n_keep tokens; ratios to it for the compressed arm
    for entry in summary["sweep"]:
        k = n_keep_for(entry["length"], 0.8)
        assert entry["K"] == k and entry["native_stock"]["prompt_length"] == k
        assert entry["native_growing"]["cache_layer_types"] == ["GrowingLayer"]
        row = entry["strategies"]["lookm-pivotal"]
        assert row["vs_native"] is not None and row["kv_mib"] == entry["native_stock"]["kv_mib"]

    # the cache arms: stock and growing, full and compressed, with the bytes bound
    caches = {row["name"]: row for row in summary["caches"]}
    assert caches["full, stock cache"]["cache_layer_types"] == ["DynamicLayer"]
    assert caches["full, our growing cache"]["cache_layer_types"] == ["GrowingLayer"]
    assert caches["compressed, stock cache"]["cache_layer_types"] == ["DynamicLayer"]
    assert caches["compressed, our growing cache"]["cache_layer_types"] == ["GrowingLayer"]
    assert caches["full, stock cache"]["bytes_bound"] == 1.0
    assert caches["compressed, our growing cache"]["bytes_bound"] > 1.0


def test_workers_pass_caches_between_processes(decode: ModuleType, tmp_path: Path) -> None:
    """Phase A (prefill) and phase B (decode) in fresh processes: the compressed cache travels with its state."""
    args = decode.parse_args([*TINY_MODEL, "--decode-tokens=3", "--threads=1", "--image-tokens=16"])
    config = decode.config_from_args(args)
    runner = decode.Runner(config, "subprocess")
    arms = [decode.Arm("h2o", 0.8, 120), decode.Arm("native-K", 0.8, 120, "stock")]
    paths = [tmp_path / "h2o.pt", tmp_path / "native.pt"]
    prefilled = [runner.prefill(arm, path) for arm, path in zip(arms, paths)]
    assert all(path.exists() for path in paths)
    assert prefilled[0]["compression_s"] and prefilled[0]["report"]["layers_compressed"] == 2
    assert prefilled[1]["prompt_length"] == n_keep_for(120, 0.8)
    decoded = runner.decode(arms, paths)
    for arm in arms:
        assert len(decoded[arm.key]["decode_step_ms"]) == 3
    # h2o evicts while decoding: the cache stays at its budget
    assert decoded[arms[0].key]["kv_bytes_after_decode"] == n_keep_for(120, 0.8) * ENTRY_BYTES


def test_compare_kept_sets() -> None:
    compare = _load("kvpress_compare")
    ours = {"0": [[1, 2, 3], [4, 5, 6]], "1": [[1, 2, 3], [4, 5, 6]]}
    same = compare.compare_kept(ours, {"0": [[3, 2, 1], [4, 5, 6]], "1": [[1, 2, 3], [6, 5, 4]]})
    assert same["all_identical"] and same["identical_heads"] == 4 and same["mean_jaccard"] == 1.0
    other = compare.compare_kept(ours, {"0": [[1, 2, 9], [4, 5, 6]], "1": [[1, 2, 3], [4, 5, 6]]})
    assert not other["all_identical"] and other["identical_heads"] == 3 and other["max_differing_entries"] == 1


COMPARE_TINY = [*TINY_MODEL, "--length=400", "--decode-tokens=2", "--threads=1", "--quiet"]


def test_compare_runs_our_side_without_kvpress(
    compare: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "compare.json"
    summary = compare.main([*COMPARE_TINY, "--arms", "snapkv", f"--kvpress-venv={tmp_path / 'none'}", f"--out={out}"])
    assert "kvpress venv not found" in capsys.readouterr().out
    assert not summary["kvpress_ran"] and json.loads(out.read_text())["rows"]
    row = summary["rows"][0]
    assert row["arm"] == "snapkv" and row["kvpress"]["runs"] == 0
    assert row["ours"]["prefill_s"] > 0 and row["ours"]["compression_s"] > 0 and row["ours"]["decode_ms"] > 0
    kept = summary["runs"]["snapkv"]["ours"][0]["kept"]
    n_keep = n_keep_for(400, 0.8)
    assert sorted(kept, key=int) == ["0", "1"] and all(len(head) == n_keep for head in kept["0"])


@pytest.mark.skipif(
    not (BENCHMARKS / ".kvpress-venv" / "bin" / "python").exists(),
    reason="kvpress venv not set up (bash benchmarks/setup_kvpress_env.sh)",
)
def test_compare_against_kvpress_keeps_the_same_entries(compare: ModuleType, tmp_path: Path) -> None:
    summary = compare.main([*COMPARE_TINY, "--arms", "snapkv", "streaming", f"--out={tmp_path / 'compare.json'}"])
    assert summary["kvpress_ran"] and summary["kvpress"]["kvpress"] == "0.5.5"
    for row in summary["rows"]:
        assert row["kvpress"]["prefill_s"] > 0 and row["prefill_ratio"] is not None, row["arm"]
        assert row["kept"]["all_identical"], (row["arm"], row["kept"])
