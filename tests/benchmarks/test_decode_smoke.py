"""Smoke tests of ``python -m benchmarks.decode`` and ``python -m benchmarks.kvpress_compare`` at a tiny size.

They run, measure every arm and write what they promise; timings are never asserted (they are
what the benchmarks measure, not what they check). The kvpress side of the comparison needs
benchmarks/.kvpress-venv (bash benchmarks/setup_kvpress_env.sh) and is skipped without it; the
kvpress-mm side runs either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.decode.cli as decode
import benchmarks.kvpress_compare.cli as compare
from benchmarks.decode.arms import Arm
from benchmarks.decode.decoding import decode_rounds
from benchmarks.decode.processes import run_in_process
from benchmarks.kvpress_compare.report import compare_kept
from kvpress_mm.cache.growing import DEFAULT_HEADROOM as GROWING_HEADROOM
from kvpress_mm.ops.budget import n_keep_for

TINY_MODEL = ["--hidden=64", "--intermediate=128", "--layers=2", "--heads=4", "--kv-heads=4", "--vocab=256"]
# keys and values of one entry in every layer: 2 layers x 2 x 4 KV heads x head_dim 16 x 4 bytes
ENTRY_BYTES = 2 * 2 * 4 * 16 * 4


def test_tiny_decode_run_reports_every_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
        "--overhead-strategies",
        "snapkv",
        "--cache-length=200",
        "--decode-tokens=3",
        "--decode-burst=2",
        "--threads=1",
        "--isolation=inline",
        "--quiet",
        f"--out={out}",
    ]
    decode.main(argv)
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    parts = ("GRID", "LENGTH SWEEP", "COMPRESSION OVERHEAD", "PEAK MEMORY", "CACHE ARMS", "RAGGED STORAGE")
    for part in (*parts, "native-K target"):
        assert part in printed
    assert "wall time:" in printed
    assert (tmp_path / "decode.png").stat().st_size > 0

    # every arm was prefilled (uncompressed growing arms copy their stock arm's cache) and decoded
    for key, arm in summary["arms"].items():
        if arm["derived_from"] is None:
            assert arm["prefill_s"] and arm["prefill_s"][0] > 0, key
            assert arm["prefill_cpu_s"][0] > 0, key
            assert arm["prefill_peak_growth"] >= 0, key
        else:
            assert arm["key"].endswith("growing") and arm["derived_from"] == arm["key"][: -len("growing")] + "stock"
            assert arm["prefill_s"] == [] and arm["cache_layer_types"] == ["GrowingLayer"], key
        assert len(arm["decode_step_ms"]) == 3, key
        assert arm["decode_ms_per_token"] > 0, key

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
        assert row["overhead"] == row["overhead_cpu"] and row["overhead_end_to_end"] is not None  # --threads=1
        assert row["compression_peak_mib"] is not None
        assert row["cache_layer_types"] == ["GrowingLayer"]
        # the cache holds n_keep entries; a growing layer allocates at most its headroom more
        n_keep = n_keep_for(200, row["ratio"])
        # the JSON rounds MiB: compare in bytes to within that rounding
        assert row["kv_mib"] * 2**20 == pytest.approx(n_keep * ENTRY_BYTES, abs=16)
        allocated = row["kv_allocated_mib"] * 2**20
        assert n_keep * ENTRY_BYTES - 16 <= allocated <= (n_keep + GROWING_HEADROOM) * ENTRY_BYTES + 16
    assert grid[0]["kv_mib"] * 2**20 == pytest.approx(200 * ENTRY_BYTES, abs=16)
    assert grid[0]["cache_layer_types"] == ["DynamicLayer"]

    # the sweep: native-K is a prompt of K = n_keep tokens; ratios to it for the compressed arm
    for entry in summary["sweep"]:
        k = n_keep_for(entry["length"], 0.8)
        assert entry["K"] == k and entry["native_stock"]["prompt_length"] == k
        assert entry["native_growing"]["cache_layer_types"] == ["GrowingLayer"]
        row = entry["strategies"]["lookm-pivotal"]
        assert row["vs_native"] is not None and row["kv_mib"] == entry["native_stock"]["kv_mib"]
        # --overhead-strategies: at the longest length only
        assert list(entry["extra"]) == (["snapkv"] if entry["length"] == 200 else [])
    assert set(summary["overhead_targets"]) == {"lookm-pivotal", "snapkv"}
    assert summary["overhead_targets"]["lookm-pivotal"]["max"] == 1.3
    assert summary["overhead_targets"]["snapkv"]["max"] == 1.05
    # which source ran, as a git revision: no machine path in results that go into the docs
    source = summary["machine"]["kvpress_mm"]
    assert source == "unknown" or source.split("+")[0].isalnum() and "/" not in source

    # peak memory against L: every sweep length, bytes per token, a fit
    memory = summary["memory"]
    assert memory["lengths"] == [100, 200]
    step = memory["compression_step"]["lookm-pivotal"]
    assert step["lengths"] == [100, 200] and set(step["bytes_per_token"]) == {"100", "200"}
    assert step["fit_bytes"] is not None and memory["prefill"]["full"]["peak_mib"][0] >= 0

    # the cache arms: stock and growing, full and compressed, with the bytes bound
    caches = {row["name"]: row for row in summary["caches"]}
    assert caches["full, stock cache"]["cache_layer_types"] == ["DynamicLayer"]
    assert caches["full, our growing cache"]["cache_layer_types"] == ["GrowingLayer"]
    assert caches["snapkv, stock cache"]["cache_layer_types"] == ["DynamicLayer"]
    assert caches["snapkv, our growing cache"]["cache_layer_types"] == ["GrowingLayer"]
    assert caches["lookm-pivotal, our growing cache"]["cache_layer_types"] == ["GrowingLayer"]
    assert caches["full, stock cache"]["bytes_bound"] == 1.0
    assert caches["full, our growing cache"]["kv_mib"] == caches["full, stock cache"]["kv_mib"]
    assert caches["snapkv, our growing cache"]["bytes_bound"] > 1.0

    # ragged storage: adakv stores exactly snapkv's bytes (the same total, per-head lengths), far below masking
    ragged = summary["ragged"]
    layouts = {row["name"]: row for row in ragged["layouts"]}
    assert ragged["ragged_bytes_equal_rectangular"]
    assert "RaggedLayer" in ragged["ragged_layer_types"], "the tiny run should give some layer uneven heads"
    exact = layouts["adakv ragged per-head storage (kvpress-mm)"]
    assert exact["kv_mib"] * 2**20 * 2 == pytest.approx(n_keep_for(200, 0.8) * ENTRY_BYTES, abs=16)
    assert layouts["kvpress AdaKVPress (masks, keeps every entry)"]["share_of_full"] == 1.0
    padded = layouts["adakv padded to the longest head"]
    assert exact["kv_mib"] < padded["kv_mib"] < layouts["full (no compression)"]["kv_mib"]
    lengths = ragged["head_lengths"]
    assert [sum(layer) for layer in lengths] == [4 * n_keep_for(200, 0.8)] * 2  # kv heads x n_keep, every layer
    assert exact["decode_ms"] > 0 and ragged["decode_ratio"] is not None


def test_one_prompt_length_in_a_fresh_process() -> None:
    """A worker process prefills and decodes every arm of one length; its progress lines are passed on."""
    args = decode.parse_args([*TINY_MODEL, "--decode-tokens=3", "--threads=1", "--image-tokens=16"])
    config = decode.config_from_args(args)
    arms = [
        Arm("native-K", 0.8, 120, "stock"),
        Arm("native-K", 0.8, 120, "growing"),
        Arm("h2o", 0.8, 120),
    ]
    updates: list[str] = []
    results = run_in_process(config, arms, updates.append)
    assert len(updates) == len(arms) + decode_rounds(config)
    assert updates[0] == f"prefill {arms[0].key}"
    native, copied, h2o = (results[arm.key] for arm in arms)
    assert native["prompt_length"] == n_keep_for(120, 0.8) and native["cache_layer_types"] == ["DynamicLayer"]
    assert copied["derived_from"] == arms[0].key and copied["kv_bytes_held"] == native["kv_bytes_held"]
    assert h2o["compression_s"] and h2o["report"]["layers_compressed"] == 2
    for arm in arms:
        assert len(results[arm.key]["decode_step_ms"]) == 3
    # h2o evicts while decoding: the cache stays at its budget
    assert h2o["kv_bytes_after_decode"] == n_keep_for(120, 0.8) * ENTRY_BYTES


def test_compare_kept_sets() -> None:
    ours = {"0": [[1, 2, 3], [4, 5, 6]], "1": [[1, 2, 3], [4, 5, 6]]}
    same = compare_kept(ours, {"0": [[3, 2, 1], [4, 5, 6]], "1": [[1, 2, 3], [6, 5, 4]]})
    assert same["all_identical"] and same["identical_heads"] == 4 and same["mean_jaccard"] == 1.0
    other = compare_kept(ours, {"0": [[1, 2, 9], [4, 5, 6]], "1": [[1, 2, 3], [4, 5, 6]]})
    assert not other["all_identical"] and other["identical_heads"] == 3 and other["max_differing_entries"] == 1


COMPARE_TINY = [*TINY_MODEL, "--length=400", "--decode-tokens=2", "--threads=1", "--quiet"]


def test_compare_runs_our_side_without_kvpress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    compare.kvpress_python() is None,
    reason="kvpress venv not set up (bash benchmarks/setup_kvpress_env.sh)",
)
def test_compare_against_kvpress_keeps_the_same_entries(tmp_path: Path) -> None:
    summary = compare.main([*COMPARE_TINY, "--arms", "snapkv", "streaming", f"--out={tmp_path / 'compare.json'}"])
    assert summary["kvpress_ran"] and summary["kvpress"]["kvpress"] == "0.5.5"
    for row in summary["rows"]:
        assert row["kvpress"]["prefill_s"] > 0 and row["prefill_ratio"] is not None, row["arm"]
        assert row["kept"]["all_identical"], (row["arm"], row["kept"])
