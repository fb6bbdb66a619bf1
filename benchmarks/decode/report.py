"""The decode report: the arms' results summarized part by part, printed as tables and as Markdown."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from benchmarks.decode.arms import Config
from benchmarks.decode.caches import caches_markdown, caches_table, summarize_caches
from benchmarks.decode.grid import grid_markdown, grid_table, summarize_grid
from benchmarks.decode.memory import LINEAR_TOLERANCE, memory_markdown, memory_table, summarize_memory
from benchmarks.decode.processes import DECODE_MMAP_THRESHOLD
from benchmarks.decode.ragged import ragged_markdown, ragged_table, summarize_ragged
from benchmarks.decode.sweep import (
    NATIVE_TARGET,
    overhead_markdown,
    overhead_table,
    overhead_targets,
    summarize_sweep,
    sweep_markdown,
    sweep_table,
)
from benchmarks.harness.reports import machine_info, median_or_none

WALL_TARGET_MINUTES = 30.0  # the whole run


def row_of(result: dict[str, Any]) -> dict[str, Any]:
    """An arm's figures as the parts' rows hold them: medians, MiB."""

    def mib(value: int | None) -> float | None:
        return None if value is None else value / 2**20

    return {
        "key": result["key"],
        **result["arm"],
        "prompt_length": result["prompt_length"],
        "derived_from": result.get("derived_from"),
        "prefill_s": median_or_none(result["prefill_s"]),
        "prefill_cpu_s": median_or_none(result.get("prefill_cpu_s", [])),
        "compression_s": median_or_none(result["compression_s"]),
        "decode_ms": result.get("decode_ms_per_token"),
        "decode_ms_mean": result.get("decode_ms_mean"),
        "prefill_peak_mib": mib(result["prefill_peak_growth"]),
        "decode_peak_mib": mib(result.get("decode_peak_growth", 0)),
        "compression_peak_mib": mib(result["compression_peak_growth"]),
        "kv_mib": result["kv_bytes_held"] / 2**20,
        "kv_allocated_mib": result["kv_bytes_allocated"] / 2**20,
        "weight_mib": result["weight_bytes"] / 2**20,
        "cache_layer_types": result["cache_layer_types"],
        "head_lengths": result.get("head_lengths"),
    }


def summarize(config: Config, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tables of every part with ratios and targets."""
    rows = {key: row_of(result) for key, result in results.items()}
    cpu = config.threads == 1  # one thread: process CPU time is the prefill's own work
    grid = summarize_grid(config, rows, cpu)
    sweep = summarize_sweep(config, rows, cpu)
    overheads = overhead_targets(sweep, cpu)
    memory = summarize_memory(config, sweep)
    caches = summarize_caches(config, rows)
    ragged = summarize_ragged(config, rows)
    return {
        "benchmark": "decode",
        "config": asdict(config),
        "machine": machine_info(source_tree=True),
        "targets": {
            "native_ratio_max": NATIVE_TARGET,
            "overhead_max": {s: t["max"] for s, t in overheads.items()},
            "wall_minutes_max": WALL_TARGET_MINUTES,
            "linear_doubling_ratio_max": LINEAR_TOLERANCE,
        },
        "grid": grid,
        "sweep": sweep,
        "overhead_targets": overheads,
        "memory": memory,
        "caches": caches,
        "ragged": ragged,
        "all_native_targets_met": all(r["native_met"] for e in sweep for r in e["strategies"].values()),
        "allocator": {
            "prefill": "glibc, MALLOC_MMAP_THRESHOLD_=131072 (process isolation)",
            "decode": f"glibc, mallopt M_MMAP_THRESHOLD={DECODE_MMAP_THRESHOLD}",
        },
        "arms": results,
    }


def format_tables(summary: dict[str, Any]) -> str:
    """The printed report: model, grid, sweep, overhead, memory, cache arms, ragged storage."""
    config, machine = summary["config"], summary["machine"]
    lines = [
        f"decode: LLaVA (Llama text model hidden {config['hidden']}, MLP {config['intermediate']}, "
        f"{config['layers']} layers, {config['heads']} heads / {config['kv_heads']} KV heads, vocab {config['vocab']}, "
        f"float32, sdpa), prompts {100 * config['image_fraction']:g}% image tokens, {config['decode_tokens']} "
        f"decode tokens, {config['repeats']} repeat(s), one process per prompt length",
        f"torch {machine['torch']}, transformers {machine['transformers']}, {machine['torch_threads']} threads, "
        f"{machine['cpu_count']} CPUs, load average at the end {machine['load_average']}",
        "decode = median ms per decode step; ovh = prefill with compression / prefill of full at the same L "
        "(CPU time with one thread, else wall; 'ovh wall' = wall time), 'ovh dir' = 1 + compression / "
        "(prefill - compression); peak = RSS high-water growth of the prefill, step = of the largest compression step",
    ]
    for part in (grid_table, sweep_table, overhead_table, memory_table, caches_table, ragged_table):
        lines += ["", *part(summary)]
    lines += [
        "",
        f"native-K target (compressed / native-K with the same cache class <= {NATIVE_TARGET}) at every length: "
        f"{'PASS' if summary['all_native_targets_met'] else 'MISS'}",
    ]
    return "\n".join(lines)


def format_markdown(summary: dict[str, Any]) -> str:
    """The tables of :func:`format_tables` as Markdown (for docs/performance.md)."""
    parts = (grid_markdown, sweep_markdown, overhead_markdown, memory_markdown, caches_markdown, ragged_markdown)
    return "\n\n".join("\n".join(part(summary)) for part in parts) + "\n"
