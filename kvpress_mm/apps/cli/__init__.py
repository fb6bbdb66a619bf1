"""The ``kvpress-mm`` command line: one module per command, assembled here.

Commands: ``strategies`` (:mod:`~kvpress_mm.apps.cli.strategies`), ``demo``
(:mod:`~kvpress_mm.apps.cli.demo`), ``run`` (:mod:`~kvpress_mm.apps.cli.run`), ``bench
accuracy`` (:mod:`~kvpress_mm.apps.cli.bench_accuracy`), ``bench fidelity``
(:mod:`~kvpress_mm.apps.cli.bench_fidelity`) and ``eval milebench``
(:mod:`~kvpress_mm.apps.cli.eval_milebench`). Each command module has an ``EPILOG`` (the
examples of its ``--help``), ``add_parser`` and ``command(args)``; what commands share lives in
:mod:`~kvpress_mm.apps.cli.parsers` (argument types, option groups) and
:mod:`~kvpress_mm.apps.cli.common` (progress, threads, JSON). The work itself is done by the
application modules (:mod:`kvpress_mm.apps.demo`, :mod:`kvpress_mm.apps.run`,
:mod:`kvpress_mm.apps.bench`, :mod:`kvpress_mm.apps.eval`).

Every command has ``--help`` with examples; those a script would read have ``--json``;
``--quiet`` silences progress. Errors print one line on stderr and exit non-zero: 2 for a bad
command line or input (unknown strategy, invalid option, missing model directory, unreadable
image), 1 for a failure. Set ``KVPRESS_MM_TRACEBACK=1`` to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kvpress_mm import __version__
from kvpress_mm.apps.cli import bench_accuracy, bench_fidelity, demo, eval_milebench, run, strategies
from kvpress_mm.apps.cli.parsers import FORMATTER, PROG, UsageParser

TRACEBACK_ENV = "KVPRESS_MM_TRACEBACK"

MAIN_EPILOG = f"""examples:
  {PROG} strategies                 list every strategy (built-in and plugin) with its config
  {PROG} demo                       compare strategies on the shipped reference VLM (no download)
  {PROG} run --model DIR --image a.png --prompt "What is shown?" --strategy lookm-pivotal --ratio 0.8
  {PROG} bench accuracy --ratios 0.8              answer accuracy against compression, JSON + PNG
  {PROG} bench fidelity --ratios 0.5,0.9          fidelity to the full cache against compression
  {PROG} eval milebench --data DIR --model DIR --strategy snapkv --ratio 0.8
  {PROG} <command> --help           help and examples for one command
"""

BENCH_EPILOG = f"""examples:
  {PROG} bench accuracy --help      answer accuracy per task, strategy and ratio on the reference VLM
  {PROG} bench fidelity --help      fidelity to the full cache (any model)
"""

EVAL_EPILOG = f"""examples:
  {PROG} eval milebench --help
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``kvpress-mm`` argument parser with its subcommands."""
    parser = UsageParser(
        prog=PROG,
        description="KV-cache compression for Hugging Face vision-language and text models.",
        epilog=MAIN_EPILOG,
        formatter_class=FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", parser_class=UsageParser)
    strategies.add_parser(commands)
    demo.add_parser(commands)
    run.add_parser(commands)

    bench = commands.add_parser(
        "bench",
        help="benchmarks: answer accuracy on the reference VLM, fidelity to the full cache",
        epilog=BENCH_EPILOG,
        formatter_class=FORMATTER,
    )
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="<benchmark>", parser_class=UsageParser)
    bench.set_defaults(handler=lambda args: bench.error("choose a benchmark: accuracy, fidelity"))
    bench_accuracy.add_parser(benchmarks)
    bench_fidelity.add_parser(benchmarks)

    evaluate = commands.add_parser(
        "eval", help="quality evaluations: MileBench", epilog=EVAL_EPILOG, formatter_class=FORMATTER
    )
    evaluations = evaluate.add_subparsers(dest="evaluation", metavar="<evaluation>", parser_class=UsageParser)
    evaluate.set_defaults(handler=lambda args: evaluate.error("choose an evaluation: milebench"))
    eval_milebench.add_parser(evaluations)
    return parser


def _one_line(error: BaseException) -> str:
    """An error as one line (a pydantic ValidationError's field errors joined)."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()]
        return f"invalid {error.title} config: " + "; ".join(parts)
    return " ".join(str(error).split()) or type(error).__name__


def _command_name(args: argparse.Namespace) -> str:
    parts = [args.command, getattr(args, "benchmark", None), getattr(args, "evaluation", None)]
    return " ".join(p for p in parts if p)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvpress-mm`` console script; returns the exit code."""
    from pydantic import ValidationError

    from kvpress_mm.errors import KVPressMMError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: strategies, demo, run, bench, eval")
    name = f"{PROG} {_command_name(args)}"
    try:
        code: int = args.handler(args)
    except (KVPressMMError, ValidationError) as error:
        print(f"{name}: error: {_one_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1
    except BrokenPipeError:  # the reader went away (`kvpress-mm strategies | head`): not an error
        sys.stdout = open(os.devnull, "w")  # keeps the interpreter's final flush quiet
        return 0
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug or an environment problem: one line, the traceback on request
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(
            f"{name}: error: {type(error).__name__}: {_one_line(error)} (set {TRACEBACK_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
