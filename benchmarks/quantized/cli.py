"""The command line of ``python -m benchmarks.quantized``: measure, print the table, write JSON and Markdown."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import benchmarks.quantized
from benchmarks.harness import RESULTS
from benchmarks.harness.reports import (
    argument_parser,
    config_values,
    machine_info,
    md_table,
    rounded,
    verdict,
    write_json,
)
from benchmarks.quantized.measure import CACHES, PRODUCT_TOLERANCE, Config, measure

DEFAULT_OUT = RESULTS / "quantized.json"
MIB = 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see :mod:`benchmarks.quantized`)."""
    defaults = Config()
    parser = argument_parser("benchmarks.quantized", benchmarks.quantized.__doc__)
    parser.add_argument("--length", type=int, default=defaults.length, help="prompt entries per layer")
    parser.add_argument("--ratio", type=float, default=defaults.ratio, help="compression ratio r")
    parser.add_argument("--kv-heads", type=int, default=defaults.kv_heads, help="KV heads of the layer")
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim, help="head dimension")
    parser.add_argument("--dtype", default=defaults.dtype, choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--q-group-size", type=int, default=defaults.q_group_size, help="quanto / HQQ group size")
    parser.add_argument(
        "--residual-length", type=int, default=defaults.residual_length, help="quanto / HQQ full-precision window"
    )
    parser.add_argument(
        "--caches", nargs="+", choices=list(CACHES), default=list(defaults.caches), help="quantized caches to measure"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="JSON results file (the Markdown table beside it)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


def _mib(value: float) -> str:
    return f"{value / MIB:.3f}"


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per cache: MiB and fractions of full for the four layers, the product check, the window's."""
    rows = []
    for name, row in summary["caches"].items():
        if "skipped" in row:
            rows.append([name, *["-"] * 10, f"skipped: {row['skipped']}"])
            continue
        prefill = row["after_prefill"]
        measured, fraction = prefill["bytes"], prefill["fraction_of_full"]
        window = row.get("with_full_residual")
        window_cells = ["0 (no window)", "-", "-", ""]
        if window is not None:
            window_cells = [
                f"+{_mib(window['residual_bytes'])}",
                f"{_mib(window['bytes']['both'])} ({window['fraction_of_full']['both']:.4f})",
                f"{window['both_over_expected']:.3f}",
                verdict(window["within_tolerance"]),
            ]
        rows.append(
            [
                name,
                _mib(measured["full"]),
                f"{_mib(measured['compressed'])} ({fraction['compressed']:.3f})",
                f"{_mib(measured['quantized'])} ({fraction['quantized']:.3f})",
                f"{_mib(measured['both'])} ({fraction['both']:.4f})",
                f"{prefill['both_over_expected']:.3f}",
                verdict(prefill["within_tolerance"]),
                *window_cells,
                f"{row['quantize_kept_s'] * 1000:.0f}",
            ]
        )
    return rows


HEADER = [
    "cache",
    "full MiB",
    "compressed MiB (of full)",
    "quantized MiB (of full)",
    "both MiB (of full)",
    "both / product",
    f"both within {PRODUCT_TOLERANCE:.0%}",
    "full residual window MiB",
    "both + window MiB (of full)",
    "both + window / expected",
    f"with window within {PRODUCT_TOLERANCE:.0%}",
    "quantize kept ms",
]


def format_markdown(summary: dict[str, Any]) -> str:
    """The table as Markdown, with a line on what was measured."""
    config = summary["config"]
    head = (
        f"Stored KV bytes of one layer (keys + values), {config['length']} prompt entries, {config['kv_heads']} KV "
        f"heads x head_dim {config['head_dim']}, {config['dtype']}, compression ratio {config['ratio']} "
        f"({summary['n_keep']} entries kept per head), q_group_size {config['q_group_size']}, residual_length "
        f"{config['residual_length']}. Product = quantized x compressed / full; with the residual window full "
        "(residual_length - 1 decoded entries in full precision), expected = (quantized - window) x compressed "
        "/ full + window."
    )
    return "\n".join([head, "", *md_table(HEADER, table_rows(summary))]) + "\n"


def summarize(config: Config, caches: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON written: configuration, machine, each cache's figures."""
    from kvpress_mm.ops.budget import n_keep_for

    return {
        "benchmark": "quantized",
        "config": {**config.__dict__, "caches": list(config.caches)},
        "n_keep": n_keep_for(config.length, config.ratio),
        "machine": machine_info(source_tree=True),
        "caches": rounded(caches),
        "all_within_tolerance": all(
            part["within_tolerance"]
            for row in caches.values()
            if "skipped" not in row
            for part in (row["after_prefill"], row.get("with_full_residual", row["after_prefill"]))
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON and Markdown; returns the summary."""
    import torch

    args = parse_args(argv)
    config = Config(**config_values(Config, args))
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    summary = summarize(config, measure(config, log=not args.quiet))
    markdown = format_markdown(summary)
    print(markdown)
    write_json(args.out, summary, indent=2)
    path = args.out.with_suffix(".md")
    path.write_text(markdown)
    print(f"written: {args.out}, {path}")
    return summary
