"""The command line of ``python -m benchmarks.prefill_decode`` (and of its memory workers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import benchmarks.prefill_decode
from benchmarks.harness import RESULTS
from benchmarks.harness.models import add_model_arguments
from benchmarks.harness.reports import argument_parser, config_values, write_json
from benchmarks.prefill_decode.measure import Config, build_model, measure, measure_peak_memory
from benchmarks.prefill_decode.report import format_table, summarize

DEFAULT_OUT = RESULTS / "prefill_decode.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see :mod:`benchmarks.prefill_decode`)."""
    defaults = Config()
    parser = argument_parser("benchmarks.prefill_decode", benchmarks.prefill_decode.__doc__)
    parser.add_argument("--length", type=int, default=defaults.length, help="prompt tokens")
    parser.add_argument("--ratio", type=float, default=defaults.ratio, help="compression ratio r")
    parser.add_argument("--decode-tokens", type=int, default=defaults.decode_tokens, help="greedy tokens generated")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed runs of every arm (median)")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=list(defaults.strategies),
        help="strategies to compare with no compressor: names, or wrapper specs such as pyramid:snapkv",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--memory",
        choices=("subprocess", "inline", "off"),
        default=defaults.memory,
        help="peak memory: a fresh process per arm (honest), in this process (fast, indicative), or not at all",
    )
    add_model_arguments(parser, defaults)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    """A :class:`Config` from parsed arguments (unknown strategies fail early)."""
    from kvpress_mm.apps.run import compressor_from_spec

    for name in args.strategies:
        compressor_from_spec(name, args.ratio)  # raises with the available names, or on a refused combination
    return Config(**config_values(Config, args))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON; returns the summary."""
    args = parse_args(argv)
    config = config_from_args(args)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if args.memory_worker is not None:
        model = build_model(config)
        print(json.dumps(measure_peak_memory(model, config, args.memory_worker)))
        return {}
    summary = summarize(config, measure(config, log=not args.quiet))
    print(format_table(summary))
    write_json(args.out, summary, indent=2)
    print(f"\nwritten: {args.out}")
    return summary
