"""The summary of kvpress_compare: kept sets compared, medians per side, ratios ours / kvpress, the tables."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any

from benchmarks.harness.reports import fmt, machine_info, md_table, median_or_none, ratio_or_none, verdict
from benchmarks.kvpress_compare.arms import Config, pairs

PREFILL_TARGET = 1.0  # (prefill + compression) ours / kvpress


def compare_kept(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Per layer and KV head: are the kept position sets identical? And how much do they overlap?"""
    layers = sorted(set(ours) & set(theirs), key=int)
    heads = identical = 0
    differing: list[int] = []
    overlaps: list[float] = []
    for layer in layers:
        for mine, other in zip(ours[layer], theirs[layer]):
            a, b = set(mine), set(other)
            heads += 1
            identical += a == b
            differing.append(len(a ^ b) // 2)
            overlaps.append(len(a & b) / max(1, len(a | b)))
    return {
        "layers": len(layers),
        "heads": heads,
        "identical_heads": identical,
        "all_identical": heads > 0 and identical == heads and len(set(ours)) == len(set(theirs)),
        "n_kept_ours": len(ours[layers[0]][0]) if layers else None,
        "n_kept_kvpress": len(theirs[layers[0]][0]) if layers else None,
        "max_differing_entries": max(differing) if differing else None,
        "mean_jaccard": statistics.fmean(overlaps) if overlaps else None,
    }


def without_kept(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` without the runs' kept positions (``rows[*]["kept"]`` compares them), for a small JSON."""
    runs = {
        arm: {side: [{k: v for k, v in r.items() if k != "kept"} for r in results] for side, results in sides.items()}
        for arm, sides in summary["runs"].items()
    }
    return {**summary, "runs": runs}


def summarize(config: Config, runs: dict[str, dict[str, list[dict[str, Any]]]], kvpress_ran: bool) -> dict[str, Any]:
    """Medians per side and arm, ratios ours / kvpress, kept-set comparisons."""
    rows = []
    for pair in pairs(config.ratio):
        if pair.name not in config.arms:
            continue
        sides = runs.get(pair.name, {})
        row: dict[str, Any] = {"arm": pair.name, "ours_settings": pair.ours, "kvpress_settings": pair.kvpress}
        for side in ("ours", "kvpress"):
            results = sides.get(side, [])
            row[side] = {
                "prefill_s": median_or_none([r["prefill_s"] for r in results]),
                "prefill_cpu_s": median_or_none([r["prefill_cpu_s"] for r in results if "prefill_cpu_s" in r]),
                "compression_s": median_or_none([r["compression_s"] for r in results]),
                "decode_ms": median_or_none(
                    [statistics.median(r["decode_step_ms"]) for r in results if r["decode_step_ms"]]
                ),
                "runs": len(results),
            }
        row["prefill_wall_ratio"] = ratio_or_none(row["ours"]["prefill_s"], row["kvpress"]["prefill_s"])
        row["prefill_cpu_ratio"] = ratio_or_none(row["ours"]["prefill_cpu_s"], row["kvpress"]["prefill_cpu_s"])
        # one thread: process CPU time is the prefill's own work (immune to time slices lost to other load)
        cpu = config.threads == 1 and row["prefill_cpu_ratio"] is not None
        row["prefill_measure"] = "CPU time" if cpu else "wall time"
        row["prefill_ratio"] = row["prefill_cpu_ratio"] if cpu else row["prefill_wall_ratio"]
        row["decode_ratio"] = ratio_or_none(row["ours"]["decode_ms"], row["kvpress"]["decode_ms"])
        row["prefill_target_met"] = None if row["prefill_ratio"] is None else row["prefill_ratio"] <= PREFILL_TARGET
        if sides.get("ours") and sides.get("kvpress") and (pair.compare_kept or pair.name == "h2o"):
            row["kept"] = compare_kept(sides["ours"][0]["kept"], sides["kvpress"][0]["kept"])
        rows.append(row)
    versions = next((r[0]["versions"] for s in runs.values() for k, r in s.items() if k == "kvpress" and r), None)
    return {
        "benchmark": "kvpress_compare",
        "config": asdict(config),
        "machine": machine_info(source_tree=True),
        "kvpress": versions,
        "kvpress_ran": kvpress_ran,
        "rows": rows,
        "runs": runs,
    }


def _verdict(row: dict[str, Any]) -> str:
    """PASS / MISS of the prefill target; none for the baselines."""
    return "" if row["arm"].startswith("baseline") else verdict(row["prefill_target_met"])


def _kept_text(kept: dict[str, Any] | None, n_keep: bool) -> str:
    """The kept-entries cell: identical or not, over how many heads, (the budgets,) the mean Jaccard index."""
    if kept is None:
        return ""
    budgets = f"n_keep {kept['n_kept_ours']} / {kept['n_kept_kvpress']}, " if n_keep else ""
    return (
        f"{'identical' if kept['all_identical'] else 'differ'}: {kept['identical_heads']}/{kept['heads']} "
        f"heads, {budgets}Jaccard {kept['mean_jaccard']:.3f}"
    )


def format_table(summary: dict[str, Any]) -> str:
    """The printed comparison."""
    config, machine, versions = summary["config"], summary["machine"], summary["kvpress"] or {}
    lines = [
        f"kvpress_compare: random Llama (hidden {config['hidden']}, MLP {config['intermediate']}, {config['layers']} "
        f"layers, {config['heads']} heads / {config['kv_heads']} KV heads, vocab {config['vocab']}, float32), "
        f"L={config['length']}, r={config['ratio']}, {config['decode_tokens']} decode tokens, "
        f"{config['repeats']} repeat(s), a fresh process per side and arm",
        f"kvpress-mm: torch {machine['torch']}, transformers {machine['transformers']}; kvpress "
        f"{versions.get('kvpress', '-')}: transformers {versions.get('transformers', '-')}, torch "
        f"{versions.get('torch', '-')}; {machine['torch_threads']} threads, load average at the end "
        f"{machine['load_average']}",
    ]
    if not summary["kvpress_ran"]:
        lines.append("kvpress venv not found (bash benchmarks/setup_kvpress_env.sh): kvpress-mm's side only")
    header = (
        f"{'arm':<15} {'prefill s ours':>14} {'kvpress':>8} {'ratio':>6} {'':4} {'wall':>6} {'compr s ours':>12} "
        f"{'kvpress':>8} "
        f"{'decode ms ours':>14} {'kvpress':>8} {'ratio':>6}  kept entries"
    )
    lines += ["", header, "-" * len(header)]
    for row in summary["rows"]:
        ours, theirs = row["ours"], row["kvpress"]
        lines.append(
            f"{row['arm']:<15} {fmt(ours['prefill_s'], '14.2f')} {fmt(theirs['prefill_s'], '8.2f')} "
            f"{fmt(row['prefill_ratio'], '6.3f')} {_verdict(row):4} {fmt(row['prefill_wall_ratio'], '6.3f')} "
            f"{fmt(ours['compression_s'], '12.3f')} "
            f"{fmt(theirs['compression_s'], '8.3f')} {fmt(ours['decode_ms'], '14.1f')} "
            f"{fmt(theirs['decode_ms'], '8.1f')} {fmt(row['decode_ratio'], '6.3f')}  "
            f"{_kept_text(row.get('kept'), n_keep=True)}"
        )
    lines += [
        "",
        f"prefill = start of generate to the first logits, compression included; ratio = ours / kvpress "
        f"(target <= {PREFILL_TARGET} for the compressed arms), of process CPU times with --threads 1, else of wall "
        "times; 'wall' = the wall-time ratio. h2o: ours on sdpa with the column sums computed in chunks (no "
        "[heads, L, L] tensor), "
        "kvpress's ObservedAttentionPress on eager attention (it needs the [heads, L, L] weights); its scores are "
        "normalised by each key's number of queries, ours are plain sums (H2O): different kept sets by design.",
        "decode = median step; ours decodes on the session's GrowingLayer, kvpress on DynamicLayer (torch.cat).",
    ]
    return "\n".join(lines)


def format_markdown(summary: dict[str, Any]) -> str:
    """The comparison as a Markdown table (for docs/performance.md)."""
    header = [
        "arm",
        "prefill s ours",
        "kvpress",
        "ratio",
        "compression s ours",
        "kvpress",
        "decode ms ours",
        "kvpress",
        "ratio",
        "kept entries",
    ]
    rows = []
    for row in summary["rows"]:
        ours, theirs = row["ours"], row["kvpress"]
        rows.append(
            [
                f"`{row['arm']}`",
                fmt(ours["prefill_s"], ".2f"),
                fmt(theirs["prefill_s"], ".2f"),
                (fmt(row["prefill_ratio"], ".3f") + " " + _verdict(row)).rstrip(),
                fmt(ours["compression_s"], ".3f"),
                fmt(theirs["compression_s"], ".3f"),
                fmt(ours["decode_ms"], ".1f"),
                fmt(theirs["decode_ms"], ".1f"),
                fmt(row["decode_ratio"], ".3f"),
                _kept_text(row.get("kept"), n_keep=False),
            ]
        )
    return "\n".join(md_table(header, rows, text=(0, len(header) - 1))) + "\n"
