"""The ragged part of the decode report: per-head budgets (``adakv``) really shrink the cache.

At ``cache_length`` and ``sweep_ratio``: ``full``, the rectangular ``ragged_baseline`` (``snapkv``) and
the ``ragged_strategy`` (``adakv``, whose default inner strategy is that ``snapkv``), all measured, and
two layouts computed from the measured head lengths: kvpress's ``AdaKVPress`` (it keeps the whole
cache and masks the evicted entries: the full cache's bytes) and a rectangular layout padded to
the longest head of each layer. Bytes are per layer (the mean over layers); decode ms/token of the
ragged arm against the rectangular one, measured in the same process, interleaved.
"""

from __future__ import annotations

from typing import Any

from benchmarks.decode.arms import Config, ragged_arms
from benchmarks.harness.reports import column, fmt, md_table, ratio_or_none


def _padded_bytes(row: dict[str, Any]) -> float | None:
    """Bytes per layer if every head of a layer were padded to the layer's longest head (MiB)."""
    lengths = row.get("head_lengths")
    if not lengths:
        return None
    stored = sum(sum(layer) for layer in lengths)
    per_entry = row["kv_mib"] / stored  # one head's key and value of one entry, in MiB
    return sum(len(layer) * max(layer) for layer in lengths) * per_entry / len(lengths)


def summarize_ragged(config: Config, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """KV bytes per layer of every layout, the head-length spread, and decode times against the rectangular arm."""
    full, baseline, ragged = (rows[arm.key] for arm in ragged_arms(config))
    layers = config.layers
    lengths = ragged.get("head_lengths") or []
    spread = [max(layer) / (sum(layer) / len(layer)) for layer in lengths if sum(layer)]
    measured = {"full": full, "ragged": ragged, "baseline": baseline}
    names = {
        "full": "full (no compression)",
        "masked": "kvpress AdaKVPress (masks, keeps every entry)",
        "padded": f"{config.ragged_strategy} padded to the longest head",
        "ragged": f"{config.ragged_strategy} ragged per-head storage (kvpress-mm)",
        "baseline": f"{config.ragged_baseline} rectangular",
    }
    padded = _padded_bytes(ragged)
    kv_mib = {
        "full": full["kv_mib"] / layers,
        "masked": full["kv_mib"] / layers,  # kvpress keeps the whole cache
        "padded": padded,
        "ragged": ragged["kv_mib"] / layers,
        "baseline": baseline["kv_mib"] / layers,
    }
    layouts = []
    for kind, name in names.items():
        if kv_mib[kind] is None:
            continue
        row = measured.get(kind)
        layouts.append(
            {
                "name": name,
                "kv_mib": kv_mib[kind],
                "decode_ms": None if row is None else row["decode_ms"],
                "compression_s": None if row is None or kind == "full" else row["compression_s"],
            }
        )
    for layout in layouts:
        layout["share_of_full"] = ratio_or_none(layout["kv_mib"], full["kv_mib"] / layers)
        layout["decode_vs_rectangular"] = ratio_or_none(layout["decode_ms"], baseline["decode_ms"])
    return {
        "length": config.cache_length,
        "ratio": config.sweep_ratio,
        "layouts": layouts,
        "ragged_layer_types": ragged["cache_layer_types"],
        "head_lengths": lengths,
        "longest_head_over_mean": {"min": min(spread, default=None), "max": max(spread, default=None)},
        "ragged_bytes_equal_rectangular": abs(ragged["kv_mib"] - baseline["kv_mib"]) < 1e-9,
        "decode_ratio": ratio_or_none(ragged["decode_ms"], baseline["decode_ms"]),
    }


def ragged_table(summary: dict[str, Any]) -> list[str]:
    """The printed ragged part."""
    part = summary["ragged"]
    lines = [
        f"RAGGED STORAGE (L = {part['length']}, r = {part['ratio']}; KV bytes per layer, mean over layers; "
        "decode ms/token and its ratio to the rectangular arm, measured interleaved; compr s = the compression, "
        "all layers)"
    ]
    header = f"{'cache layout':<52} {'KV MiB/layer':>12} {'of full':>7} {'compr s':>7} {'decode ms':>9} {'vs rect':>7}"
    lines += [header, "-" * len(header)]
    for layout in part["layouts"]:
        lines.append(
            f"{layout['name']:<52} {column(layout['kv_mib'], '12.3f')} {column(layout['share_of_full'], '7.3f')} "
            f"{column(layout['compression_s'], '7.3f')} {column(layout['decode_ms'], '9.1f')} "
            f"{column(layout['decode_vs_rectangular'], '7.2f')}"
        )
    spread = part["longest_head_over_mean"]
    lines.append(
        f"longest head / mean head per layer: {fmt(spread['min'], '.2f')} .. {fmt(spread['max'], '.2f')}; "
        f"ragged cache layers: {', '.join(part['ragged_layer_types'])}"
    )
    return lines


def ragged_markdown(summary: dict[str, Any]) -> list[str]:
    """The ragged part as Markdown."""
    part = summary["ragged"]
    rows = [
        [
            layout["name"],
            fmt(layout["kv_mib"], ".3f"),
            fmt(layout["share_of_full"], ".3f"),
            fmt(layout["compression_s"], ".3f"),
            fmt(layout["decode_ms"], ".1f"),
            fmt(layout["decode_vs_rectangular"], ".2f"),
        ]
        for layout in part["layouts"]
    ]
    header = ["cache layout", "KV MiB per layer", "share of full", "compression s", "decode ms/token", "vs rectangular"]
    spread = part["longest_head_over_mean"]
    title = f"**Ragged storage** (L = {part['length']}, r = {part['ratio']})"
    note = f"Longest head / mean head per layer: {fmt(spread['min'], '.2f')} to {fmt(spread['max'], '.2f')}."
    return [title, "", *md_table(header, rows), "", note]
