"""The decode report's plot: decode ms/token against prompt length for every arm of the sweep, and beside it
the peak memory of the prefill and the compression step."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(summary: dict[str, Any], path: Path) -> None:
    """Decode ms/token against prompt length (log L), one line per arm of the sweep; beside it, peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sweep = summary["sweep"]
    config = summary["config"]
    lengths = [e["length"] for e in sweep]
    ticks = [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths]
    lines: dict[str, list[float | None]] = {
        "full (stock DynamicCache)": [e["full"]["decode_ms"] for e in sweep],
        "native-K (stock DynamicCache)": [e["native_stock"]["decode_ms"] for e in sweep],
        "native-K (GrowingLayer)": [e["native_growing"]["decode_ms"] for e in sweep],
    }
    ratio = config["sweep_ratio"]
    for strategy in config["sweep_strategies"]:
        lines[f"{strategy} r={ratio:g} (GrowingLayer)"] = [e["strategies"][strategy]["decode_ms"] for e in sweep]
    figure, (axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    styles = ["o-", "s--", "s-", "^-", "v-", "d-", "x-"]
    for (label, values), style in zip(lines.items(), styles):
        points = [(x, y) for x, y in zip(lengths, values) if y is not None]
        axis.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")  # the stock full cache grows far faster than the rest: log keeps both readable
    axis.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    axis.tick_params(axis="y", which="minor", labelsize=7)
    axis.set_xticks(lengths, ticks)
    axis.set_xlabel("prompt length L (native-K: the L its K = int(L * (1 - r)) stands for)", fontsize=9)
    axis.set_ylabel("decode ms / token (median step)")
    axis.set_title(
        f"Decode, random LLaVA (hidden {config['hidden']}, {config['layers']} layers, "
        f"{config['kv_heads']} KV heads), {100 * config['image_fraction']:g}% image tokens",
        fontsize=9,
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)

    memory = summary["memory"]
    full = memory["prefill"]["full"]
    memory_axis.plot(full["lengths"], full["peak_mib"], "o-", label="full: whole prefill")
    for index, (strategy, series) in enumerate(memory["compression_step"].items()):
        color = f"C{index + 1}"
        prefill = memory["prefill"][strategy]
        memory_axis.plot(
            prefill["lengths"], prefill["peak_mib"], "s--", color=color, label=f"{strategy}: whole prefill"
        )
        memory_axis.plot(
            series["lengths"], series["peak_mib"], "^-", color=color, label=f"{strategy}: compression step"
        )
    memory_axis.plot(
        lengths, memory["score_matrix_mib"], ":", color="grey", label="one [heads, L, L] fp32 (not allocated)"
    )
    memory_axis.set_xscale("log", base=2)
    memory_axis.set_yscale("log")
    memory_axis.set_xticks(lengths, ticks)
    memory_axis.set_xlabel("prompt length L", fontsize=9)
    memory_axis.set_ylabel("peak RSS growth (MiB)")
    memory_axis.set_title("Peak memory (slope 1 = linear in L)", fontsize=9)
    memory_axis.grid(True, which="both", alpha=0.3)
    memory_axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
