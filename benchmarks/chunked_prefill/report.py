"""The chunked-prefill benchmark's summary: per arm and length, KV and RSS peaks, and a line through each series."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any

from benchmarks.chunked_prefill.measure import Config
from benchmarks.harness.reports import fmt, machine_info, md_table, rounded

MIB = 2**20


def line(lengths: list[int], values: list[float]) -> dict[str, float] | None:
    """Least squares ``value = intercept + slope * length`` (None with fewer than two lengths)."""
    if len(lengths) < 2:
        return None
    mx, my = statistics.fmean(lengths), statistics.fmean(values)
    sxx = sum((x - mx) ** 2 for x in lengths)
    slope = sum((x - mx) * (y - my) for x, y in zip(lengths, values, strict=True)) / sxx if sxx else 0.0
    return {"slope_bytes_per_token": slope, "intercept_bytes": my - slope * mx}


def summarize(config: Config, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Results by arm (rows in length order) with each series' line; JSON-ready."""
    arms: dict[str, Any] = {}
    for arm in config.arms:
        rows = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["length"])
        for row in rows:
            row["kv_bytes_above_result"] = row["kv_bytes_peak"] - row["kv_bytes_after"]
        lengths = [r["length"] for r in rows]
        fits = {
            name: line(lengths, [float(r[name]) for r in rows])
            for name in ("kv_bytes_peak", "kv_bytes_above_result", "rss_peak_growth_bytes")
            if all(r[name] is not None for r in rows)
        }
        arms[arm] = {"rows": rows, "fits": fits}
    return rounded({"config": asdict(config), "machine": machine_info(source_tree=True), "arms": arms})


def _fit_text(fit: dict[str, float] | None) -> str:
    if fit is None:
        return "-"
    return f"{fit['slope_bytes_per_token']:.0f} B/token + {fit['intercept_bytes'] / MIB:.1f} MiB"


def _mib(value: float | None) -> float | None:
    return None if value is None else value / MIB


def format_table(summary: dict[str, Any]) -> str:
    """The printed table: one line per (length, arm), then each series' line."""
    config = summary["config"]
    lines = [
        f"CHUNKED PREFILL: peak memory against prompt length (r = {config['ratio']}, chunk {config['chunk_size']}, "
        f"bound {config['max_entries']}; {config['layers']} layers, {config['kv_heads']} KV heads x "
        f"{config['hidden'] // config['heads']})",
        f"{'L':>6} {'arm':<34} {'KV peak MiB':>11} {'KV after':>9} {'above':>8} {'RSS peak MiB':>12} {'prefill s':>9}",
    ]
    lines.append("-" * len(lines[-1]))
    lengths = sorted({row["length"] for arm in summary["arms"].values() for row in arm["rows"]})
    for length in lengths:
        for arm, data in summary["arms"].items():
            for row in data["rows"]:
                if row["length"] != length:
                    continue
                lines.append(
                    f"{length:>6} {arm:<34} {fmt(_mib(row['kv_bytes_peak']), '11.1f')} "
                    f"{fmt(_mib(row['kv_bytes_after']), '9.1f')} {fmt(_mib(row['kv_bytes_above_result']), '8.1f')} "
                    f"{fmt(_mib(row['rss_peak_growth_bytes']), '12.1f')} {fmt(row['prefill_s'], '9.1f')}"
                )
    lines.append("lines through each series (bytes per prompt token + intercept):")
    for arm, data in summary["arms"].items():
        fits = data["fits"]
        lines.append(
            f"  {arm}: KV peak {_fit_text(fits.get('kv_bytes_peak'))}; above the result "
            f"{_fit_text(fits.get('kv_bytes_above_result'))}; RSS peak {_fit_text(fits.get('rss_peak_growth_bytes'))}"
        )
    return "\n".join(lines)


def markdown(summary: dict[str, Any]) -> str:
    """The table as Markdown (for the docs' performance page)."""
    header = ["L", "arm", "KV peak MiB", "KV after MiB", "above MiB", "RSS peak MiB", "prefill s"]
    rows = []
    for arm, data in summary["arms"].items():
        for row in data["rows"]:
            rows.append(
                [
                    str(row["length"]),
                    f"`{arm}`",
                    fmt(_mib(row["kv_bytes_peak"]), ".1f"),
                    fmt(_mib(row["kv_bytes_after"]), ".1f"),
                    fmt(_mib(row["kv_bytes_above_result"]), ".1f"),
                    fmt(_mib(row["rss_peak_growth_bytes"]), ".1f"),
                    fmt(row["prefill_s"], ".1f"),
                ]
            )
    rows.sort(key=lambda r: int(r[0]))  # stable: the arms in their order at each length
    return "\n".join(md_table(header, rows, text=(1,)))
