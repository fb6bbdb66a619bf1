"""The grid of the decode report: every strategy at every ratio at ``grid_length``, against ``full``."""

from __future__ import annotations

from typing import Any

from benchmarks.decode.arms import FULL, Config, grid_arms
from benchmarks.decode.sweep import overhead
from benchmarks.harness.reports import column, fmt, md_table, ratio_or_none


def summarize_grid(config: Config, rows: dict[str, dict[str, Any]], cpu: bool) -> list[dict[str, Any]]:
    """The grid's rows with their overhead and decode speedup over ``full`` (the first row)."""
    arms = grid_arms(config)
    full = rows[arms[0].key]
    grid = []
    for arm in arms:
        row = dict(rows[arm.key])
        row.update(overhead(row, full, cpu))
        row["decode_speedup"] = ratio_or_none(full["decode_ms"], row["decode_ms"])
        grid.append(row)
    return grid


def grid_table(summary: dict[str, Any]) -> list[str]:
    """The printed grid."""
    lines = [f"GRID (L = {summary['config']['grid_length']})"]
    header = (
        f"{'strategy':<15} {'r':>4} {'prefill s':>9} {'compr s':>8} {'ovh':>6} {'ovh wall':>8} {'ovh dir':>7} "
        f"{'peak MiB':>8} {'step MiB':>8} {'KV MiB':>8} {'decode ms':>9} {'speedup':>7}"
    )
    lines += [header, "-" * len(header)]
    for row in summary["grid"]:
        compressed = row["strategy"] != FULL
        lines.append(
            f"{row['strategy']:<15} {(format(row['ratio'], '.1f') if compressed else '-'):>4} "
            f"{column(row['prefill_s'], '9.2f')} {column(row['compression_s'], '8.3f')} "
            f"{column(row['overhead'], '6.3f')} {column(row['overhead_end_to_end'], '8.3f')} "
            f"{column(row['overhead_direct'] if compressed else None, '7.3f')} "
            f"{column(row['prefill_peak_mib'], '8.0f')} {column(row['compression_peak_mib'], '8.1f')} "
            f"{column(row['kv_mib'], '8.1f')} {column(row['decode_ms'], '9.1f')} "
            f"{column(row['decode_speedup'], '7.2f')}"
        )
    return lines


def grid_markdown(summary: dict[str, Any]) -> list[str]:
    """The grid as Markdown."""
    rows = []
    for row in summary["grid"]:
        compressed = row["strategy"] != FULL
        rows.append(
            [
                f"`{row['strategy']}`",
                format(row["ratio"], ".1f") if compressed else "-",
                fmt(row["prefill_s"], ".2f"),
                fmt(row["compression_s"], ".3f"),
                fmt(row["overhead"], ".3f") if compressed else "1",
                fmt(row["prefill_peak_mib"], ".0f"),
                fmt(row["compression_peak_mib"], ".1f"),
                fmt(row["kv_mib"], ".1f"),
                fmt(row["decode_ms"], ".1f"),
                fmt(row["decode_speedup"], ".2f"),
            ]
        )
    header = [
        "strategy",
        "r",
        "prefill s",
        "compression s",
        "overhead",
        "prefill peak MiB",
        "step peak MiB",
        "KV MiB",
        "decode ms/token",
        "speedup",
    ]
    return [f"**Grid** (L = {summary['config']['grid_length']})", "", *md_table(header, rows)]
