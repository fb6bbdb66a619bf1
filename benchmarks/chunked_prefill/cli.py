"""The command line of ``python -m benchmarks.chunked_prefill`` (and of its workers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import benchmarks.chunked_prefill
from benchmarks.chunked_prefill.measure import Config, measure, worker
from benchmarks.chunked_prefill.report import format_table, markdown, summarize
from benchmarks.harness import RESULTS
from benchmarks.harness.models import add_model_arguments
from benchmarks.harness.reports import argument_parser, config_values, write_json

DEFAULT_OUT = RESULTS / "chunked_prefill.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see :mod:`benchmarks.chunked_prefill`)."""
    defaults = Config()
    parser = argument_parser("benchmarks.chunked_prefill", benchmarks.chunked_prefill.__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(defaults.lengths), help="prompt tokens")
    parser.add_argument("--ratio", type=float, default=defaults.ratio, help="compression ratio r")
    parser.add_argument("--chunk-size", type=int, default=defaults.chunk_size, help="chunked-prefill's chunk_size")
    parser.add_argument("--max-entries", type=int, default=defaults.max_entries, help="decoding's max_entries")
    parser.add_argument("--interval", type=int, default=defaults.interval, help="decoding's interval")
    parser.add_argument("--arms", nargs="+", default=list(defaults.arms), help="strategy specs (wrappers first)")
    add_model_arguments(parser, defaults)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--isolation", choices=("process", "inline"), default="process", help="a fresh process per arm and length"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-length", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON; returns the summary."""
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(Config.from_json(args.worker_config), args.worker, args.worker_length)))
        return {}
    config = Config(**config_values(Config, args))
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)  # what the JSON's machine record reports (the workers set theirs)
    for arm in config.arms:
        config.compressor(arm)  # an unknown name or a refused combination fails here, before any run
    summary = summarize(config, measure(config, args.isolation, log=not args.quiet))
    print(format_table(summary))
    if args.markdown:
        print()
        print(markdown(summary))
    write_json(args.out, summary, indent=2)
    print(f"\nwritten: {args.out}")
    return summary
