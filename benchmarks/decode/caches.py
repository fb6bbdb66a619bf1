"""The cache arms of the decode report: transformers' ``DynamicLayer`` against kvpress-mm's ``GrowingLayer``,
for ``full``, compressed and native-K caches at ``cache_length``."""

from __future__ import annotations

from typing import Any

from benchmarks.decode.arms import FULL, NATIVE, Arm, Config
from benchmarks.harness.reports import column, fmt, md_table, ratio_or_none


def summarize_caches(config: Config, rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The named cache arms with their decode speedups and the bytes bound.

    The sweep strategies' growing arms join when ``cache_length`` is a sweep length.
    """
    length, ratio = config.cache_length, config.sweep_ratio
    named = {
        "full, stock cache": Arm(FULL, 0.0, length, "stock"),
        "full, our growing cache": Arm(FULL, 0.0, length, "growing"),
        f"{config.cache_strategy}, stock cache": Arm(config.cache_strategy, ratio, length, "stock"),
        f"{config.cache_strategy}, our growing cache": Arm(config.cache_strategy, ratio, length, "growing"),
    }
    for strategy in config.sweep_strategies:
        if strategy != config.cache_strategy and length in config.sweep_lengths:
            named[f"{strategy}, our growing cache"] = Arm(strategy, ratio, length, "growing")
    named["native-K, stock cache"] = Arm(NATIVE, ratio, length, "stock")
    named["native-K, our growing cache"] = Arm(NATIVE, ratio, length, "growing")
    base = rows[named["full, stock cache"].key]
    base_growing = rows[named["full, our growing cache"].key]
    weights = base["weight_mib"]
    caches = []
    for name, arm in named.items():
        row = dict(rows[arm.key], name=name)
        row["decode_speedup"] = ratio_or_none(base["decode_ms"], row["decode_ms"])
        row["decode_speedup_vs_growing"] = ratio_or_none(base_growing["decode_ms"], row["decode_ms"])
        row["bytes_bound"] = (weights + base["kv_mib"]) / (weights + row["kv_mib"])
        caches.append(row)
    return caches


def caches_table(summary: dict[str, Any]) -> list[str]:
    """The printed cache arms, and the weight bytes a decode step reads."""
    config = summary["config"]
    lines = [
        f"CACHE ARMS (L = {config['cache_length']}, r = {config['sweep_ratio']}; speedup over full with the stock "
        "cache and over full with our growing cache; bytes bound = (weights + full KV) / (weights + arm KV))",
    ]
    header = (
        f"{'arm':<34} {'KV MiB':>8} {'alloc MiB':>9} {'step peak MiB':>13} {'decode ms':>9} {'speedup':>7} "
        f"{'vs growing':>10} {'bytes bound':>11}"
    )
    lines += [header, "-" * len(header)]
    for row in summary["caches"]:
        lines.append(
            f"{row['name']:<34} {column(row['kv_mib'], '8.1f')} {column(row['kv_allocated_mib'], '9.1f')} "
            f"{column(row['decode_peak_mib'], '13.1f')} {column(row['decode_ms'], '9.1f')} "
            f"{column(row['decode_speedup'], '7.2f')} {column(row['decode_speedup_vs_growing'], '10.2f')} "
            f"{column(row['bytes_bound'], '11.2f')}"
        )
    weights = summary["caches"][0]["weight_mib"]
    lines.append(f"weights read per decode step = {weights:.0f} MiB (text decoder layers, final norm, LM head)")
    return lines


def caches_markdown(summary: dict[str, Any]) -> list[str]:
    """The cache arms as Markdown."""
    config = summary["config"]
    rows = [
        [
            row["name"],
            fmt(row["kv_mib"], ".1f"),
            fmt(row["kv_allocated_mib"], ".1f"),
            fmt(row["decode_ms"], ".1f"),
            fmt(row["decode_speedup"], ".2f"),
            fmt(row["decode_speedup_vs_growing"], ".2f"),
            fmt(row["bytes_bound"], ".2f"),
        ]
        for row in summary["caches"]
    ]
    header = [
        "arm",
        "KV MiB",
        "allocated MiB",
        "decode ms/token",
        "speedup vs full stock",
        "vs full growing",
        "bytes bound",
    ]
    title = f"**Cache arms** (L = {config['cache_length']}, r = {config['sweep_ratio']})"
    return [title, "", *md_table(header, rows)]
