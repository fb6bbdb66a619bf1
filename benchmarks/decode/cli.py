"""The command line of ``python -m benchmarks.decode`` (and of its worker processes, one per prompt length)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import benchmarks.decode
from benchmarks.decode.arms import QUICK, Arm, Config
from benchmarks.decode.plot import plot
from benchmarks.decode.processes import measure, worker
from benchmarks.decode.report import WALL_TARGET_MINUTES, format_markdown, format_tables, summarize
from benchmarks.harness import RESULTS
from benchmarks.harness.memory import cpu_seconds
from benchmarks.harness.models import add_model_arguments
from benchmarks.harness.reports import argument_parser, config_values, rounded, verdict, write_json

DEFAULT_OUT = RESULTS / "decode.json"


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see :mod:`benchmarks.decode`)."""
    defaults = Config()
    parser = argument_parser("benchmarks.decode", benchmarks.decode.__doc__)
    parser.add_argument("--quick", action="store_true", help=f"a shorter run: {QUICK}")
    parser.add_argument(
        "--decode-tokens", type=int, default=None, help=f"tokens generated (default {defaults.decode_tokens})"
    )
    parser.add_argument(
        "--decode-burst",
        type=int,
        default=None,
        help=f"decode steps per arm and turn (default {defaults.decode_burst})",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed prefills per arm (median)")
    parser.add_argument("--grid-length", type=int, default=None)
    parser.add_argument("--grid-ratios", type=_floats, default=None, help="comma-separated")
    parser.add_argument("--grid-strategies", nargs="+", default=None)
    parser.add_argument("--sweep-lengths", type=_ints, default=None, help="comma-separated")
    parser.add_argument("--sweep-ratio", type=float, default=None)
    parser.add_argument("--sweep-strategies", nargs="+", default=None)
    parser.add_argument(
        "--overhead-strategies",
        nargs="*",
        default=None,
        help="strategies added at the longest sweep length only, for their prefill overhead "
        f"(default: {' '.join(defaults.overhead_strategies) or 'none'})",
    )
    parser.add_argument("--cache-length", type=int, default=None)
    parser.add_argument("--cache-strategy", default=None)
    parser.add_argument("--ragged-strategy", default=None, help="per-head budgets (default adakv)")
    parser.add_argument("--ragged-baseline", default=None, help="its rectangular counterpart (default snapkv)")
    add_model_arguments(parser, None)  # default None: an option given overrides --quick's value
    parser.add_argument("--image-tokens", type=int, default=None, help="placeholders per image")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--isolation",
        choices=("process", "inline"),
        default="process",
        help="a fresh process per prompt length (default; glibc mmap threshold fixed: honest peak memory) "
        "or everything in this process",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results; the plot goes beside it (.png)")
    parser.add_argument("--plot", type=Path, default=None, help="where to write the PNG (default: beside --out)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-arms", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    """A :class:`Config` from parsed arguments (``--quick`` first, explicit options over it)."""
    from kvpress_mm.apps.run import compressor_from_spec

    config = Config(**QUICK) if args.quick else Config()  # type: ignore[arg-type]
    config = replace(config, **config_values(Config, args, given_only=True))
    names = (*config.grid_strategies, *config.sweep_strategies, *config.overhead_strategies, config.cache_strategy)
    for name in (*names, config.ragged_strategy, config.ragged_baseline):
        compressor_from_spec(name, 0.5)  # unknown names (or refused wrapper specs) fail early
    return config


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables, write JSON and PNG; returns the summary."""
    args = parse_args(argv)
    if args.worker_config is not None:  # one prompt length, in a fresh process
        worker(Config.from_json(args.worker_config), [Arm(**a) for a in json.loads(args.worker_arms)], args.worker_out)
        return {}
    config = config_from_args(args)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    results = measure(config, isolation=args.isolation, progress=not args.quiet)
    summary = summarize(config, results)
    summary["wall_seconds"] = time.perf_counter() - started
    summary["cpu_seconds"] = cpu_seconds()
    summary["isolation"] = args.isolation
    print(format_tables(summary))
    threads = summary["machine"]["torch_threads"]
    minutes = summary["wall_seconds"] / 60
    summary["wall_target_met"] = minutes <= WALL_TARGET_MINUTES
    print(
        f"\nwall time: {minutes:.1f} min (target <= {WALL_TARGET_MINUTES:g}) {verdict(summary['wall_target_met'])}; "
        f"CPU time {summary['cpu_seconds'] / 60:.1f} min (/ {threads} threads = "
        f"{summary['cpu_seconds'] / threads / 60:.1f} min: about the wall time when idle)"
    )
    write_json(args.out, rounded(summary), indent=1)
    plot_path = args.plot or args.out.with_suffix(".png")
    plot(summary, plot_path)
    markdown = args.out.with_suffix(".md")
    markdown.write_text(format_markdown(summary))
    print(f"written: {args.out}, {plot_path}, {markdown}")
    return summary
