"""Peak memory against prompt length in the decode report: the whole prefill and the compression step of the
sweep's arms, fitted and checked to grow linearly with L (never a ``[heads, L, L]`` allocation)."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.decode.arms import Config
from benchmarks.harness.reports import column, fmt, md_table, verdict

LINEAR_TOLERANCE = 1.25  # peak bytes per token at L over at L / 2: a [heads, L, L] term would double it


def _linear_fit(xs: list[float], ys: list[float]) -> dict[str, float] | None:
    """Least squares ``y = intercept + slope * x`` and the largest residual relative to ``y``."""
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if not sxx:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    residual = max(abs(y - intercept - slope * x) / y for x, y in zip(xs, ys) if y) if any(ys) else 0.0
    return {"intercept": intercept, "slope": slope, "max_relative_residual": residual}


def memory_series(lengths: list[int], peaks: list[float | None]) -> dict[str, Any]:
    """Peak MiB at each L, bytes per prompt token, a linear fit and the check that doubling L at most doubles it.

    ``linear`` compares the bytes per token at the longest L with those at half of it (when the
    sweep has both): a ``[heads, L, L]`` allocation would double them; a linear cost keeps them
    level (or lower, with fixed costs).
    """
    pairs = [(n, v) for n, v in zip(lengths, peaks) if v is not None]
    per_token = {str(n): v * 2**20 / n for n, v in pairs}
    longest = max(lengths)
    half = longest // 2
    ratio = None
    if str(longest) in per_token and str(half) in per_token and per_token[str(half)] > 0:
        ratio = per_token[str(longest)] / per_token[str(half)]
    fit = _linear_fit([float(n) for n, _ in pairs], [v * 2**20 for _, v in pairs])
    return {
        "peak_mib": [v for _, v in pairs],
        "lengths": [n for n, _ in pairs],
        "bytes_per_token": per_token,
        "doubling_ratio": ratio,
        "fit_bytes": fit,
        "linear": None if ratio is None else ratio <= LINEAR_TOLERANCE,
    }


def summarize_memory(config: Config, sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """The memory series of the sweep: ``full``'s prefill, each sweep strategy's prefill and compression step."""
    lengths = [e["length"] for e in sweep]
    memory: dict[str, Any] = {
        "lengths": lengths,
        "score_matrix_mib": [config.heads * n * n * 4 / 2**20 for n in lengths],  # one layer's [heads, L, L] float32
        "prefill": {"full": memory_series(lengths, [e["full"]["prefill_peak_mib"] for e in sweep])},
        "compression_step": {},
    }
    for strategy in config.sweep_strategies:
        series = [e["strategies"][strategy] for e in sweep]
        memory["prefill"][strategy] = memory_series(lengths, [r["prefill_peak_mib"] for r in series])
        memory["compression_step"][strategy] = memory_series(lengths, [r["compression_peak_mib"] for r in series])
    # the compression step, and the whole prefill (with strategies whose statistics are fused into attention)
    checked = [*memory["compression_step"].values(), *memory["prefill"].values()]
    verdicts = [s["linear"] for s in checked if s["linear"] is not None]
    memory["all_linear"] = all(verdicts) if verdicts else None
    return memory


def _memory_checks(memory: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The memory series checked for linearity, named: each strategy's compression step and whole prefill."""
    checks = []
    for strategy in memory["compression_step"]:
        checks.append((f"{strategy} compression step", memory["compression_step"][strategy]))
        checks.append((f"{strategy} whole prefill", memory["prefill"][strategy]))
    return checks


def _peak_at(series: dict[str, Any], length: int) -> float | None:
    return series["peak_mib"][series["lengths"].index(length)] if length in series["lengths"] else None


def _strategy_cells(memory: dict[str, Any], strategy: str, length: int) -> tuple[Any, Any, Any]:
    """A strategy's cells at ``length``: its prefill's peak, its compression step's, the step's bytes per token."""
    step = memory["compression_step"][strategy]
    return (
        _peak_at(memory["prefill"][strategy], length),
        _peak_at(step, length),
        step["bytes_per_token"].get(str(length)),
    )


def memory_table(summary: dict[str, Any]) -> list[str]:
    """The printed peak memory against L, with each series' linear fit and check."""
    memory = summary["memory"]
    strategies = list(memory["compression_step"])
    lines = [
        "PEAK MEMORY vs L (RSS high-water growth, MiB; B/tok = bytes per prompt token; [H,L,L] = one layer's "
        "float32 score matrix, never allocated)",
    ]
    header = f"{'L':>6} {'[H,L,L] MiB':>11} {'full prefill':>12}" + "".join(
        f" {s + ' prefill':>22} {'step':>7} {'step B/tok':>10}" for s in strategies
    )
    lines += [header, "-" * len(header)]
    full_series = memory["prefill"]["full"]
    for index, length in enumerate(memory["lengths"]):
        line = (
            f"{length:>6} {memory['score_matrix_mib'][index]:>11.0f} {column(_peak_at(full_series, length), '12.0f')}"
        )
        for strategy in strategies:
            prefill, step, per_token = _strategy_cells(memory, strategy, length)
            line += f" {column(prefill, '22.0f')} {column(step, '7.1f')} {column(per_token, '10.0f')}"
        lines.append(line)
    for name, series in _memory_checks(memory):
        fit = series["fit_bytes"]
        fit_text = (
            "-"
            if fit is None
            else f"{fit['slope']:.0f} B/token + {fit['intercept'] / 2**20:.1f} MiB "
            f"(largest residual {100 * fit['max_relative_residual']:.0f}%)"
        )
        lines.append(
            f"  {name}: linear fit {fit_text}; bytes/token at L over at L/2: "
            f"{column(series['doubling_ratio'], '.2f')} (linear: <= {LINEAR_TOLERANCE}) {verdict(series['linear'])}"
        )
    return lines


def memory_markdown(summary: dict[str, Any]) -> list[str]:
    """Peak memory against L as Markdown, and the fits."""
    memory = summary["memory"]
    strategies = list(memory["compression_step"])
    header = ["L", "[heads, L, L] fp32", "full: prefill"]
    for strategy in strategies:
        header += [f"{strategy}: prefill", f"{strategy}: step", f"{strategy}: step B/token"]
    rows = []
    for index, length in enumerate(memory["lengths"]):
        row = [
            str(length),
            f"{memory['score_matrix_mib'][index]:.0f}",
            fmt(_peak_at(memory["prefill"]["full"], length), ".0f"),
        ]
        for strategy in strategies:
            prefill, step, per_token = _strategy_cells(memory, strategy, length)
            row += [fmt(prefill, ".0f"), fmt(step, ".1f"), fmt(per_token, ".0f")]
        rows.append(row)
    lines = ["**Peak memory against L** (RSS high-water growth, MiB)", "", *md_table(header, rows), ""]
    for name, series in _memory_checks(memory):
        fit = series["fit_bytes"]
        if fit is not None:
            lines.append(
                f"- {name}: {fit['slope']:.0f} bytes/token + {fit['intercept'] / 2**20:.1f} MiB "
                f"(largest residual {100 * fit['max_relative_residual']:.0f}%); bytes per token at L over L/2: "
                f"{fmt(series['doubling_ratio'], '.2f')} {verdict(series['linear'])}"
            )
    return lines
