"""The ``kvpress-mm`` command line: list the registered strategies, run the embedded demo.

Every command has ``--help`` with examples and ``--json`` for machine-readable output. Errors
print one line on stderr and exit non-zero (2 for a bad command line, 1 for a failure).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn

from kvpress_mm import __version__

PROG = "kvpress-mm"

MAIN_EPILOG = f"""examples:
  {PROG} strategies                 list every strategy (built-in and plugin) with its config
  {PROG} demo                       compare strategies on an embedded tiny random model
  {PROG} demo --ratio 0.5 --strategies snapkv,lookm-pivotal
  {PROG} <command> --help           help and examples for one command
"""

STRATEGIES_EPILOG = f"""examples:
  {PROG} strategies                 one block per strategy: origin, description, config defaults
  {PROG} strategies --json          the same as a JSON list
  {PROG} strategies --json | python -c "import json,sys; print([s['name'] for s in json.load(sys.stdin)])"
"""

DEMO_EPILOG = f"""The model is a tiny random-weight LlamaForCausalLM built in code (nothing is downloaded),
with its q/k projections scaled up so attention is not uniform. The table shows KV memory,
decode time and agreement with the full cache ON A RANDOM MODEL: mechanics, not answer quality.
"full" always runs first, as the reference.

examples:
  {PROG} demo                                    every built-in strategy at ratio 0.8
  {PROG} demo --ratio 0.5                        keep half of the prompt's cache
  {PROG} demo --strategies streaming,snapkv,h2o  only these (plus the full reference)
  {PROG} demo --strategies all                   every registered strategy, plugins included
  {PROG} demo --prompt-length 64 --new-tokens 4 --quiet   a fast smoke run
  {PROG} demo --json > demo.json                 machine-readable result
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the command and pointing to ``--help``."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _ratio(text: str) -> float:
    """Parse a compression ratio, ``0 <= r < 1``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"the compression ratio must be in [0, 1), got {text}")
    return value


def _positive_int(text: str) -> int:
    """Parse an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _strategy_list(text: str) -> list[str]:
    """Parse a comma-separated list of strategy names (``all`` = every registered one)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated strategy names, e.g. snapkv,lookm-pivotal")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The ``kvpress-mm`` argument parser with its subcommands."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="KV-cache compression for Hugging Face vision-language and text models.",
        epilog=MAIN_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)

    strategies = commands.add_parser(
        "strategies",
        help="list the registered strategies (built-in and plugin)",
        description="List every registered strategy: its origin, one-line description and config defaults.",
        epilog=STRATEGIES_EPILOG,
        formatter_class=formatter,
    )
    strategies.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    strategies.set_defaults(handler=_cmd_strategies)

    demo = commands.add_parser(
        "demo",
        help="compare strategies on an embedded tiny random model (no download)",
        description="Generate greedily under several strategies on a tiny seeded random Llama and print "
        "KV memory before/after, decode ms/token and agreement with the full-cache continuation.",
        epilog=DEMO_EPILOG,
        formatter_class=formatter,
    )
    demo.add_argument(
        "--strategies",
        type=_strategy_list,
        default=None,
        metavar="NAMES",
        help="comma-separated strategy names, or 'all' (default: every built-in strategy)",
    )
    demo.add_argument(
        "--ratio",
        type=_ratio,
        default=0.8,
        help="compression ratio: fraction of the prompt's cache entries removed (default: 0.8)",
    )
    demo.add_argument("--prompt-length", type=_positive_int, default=512, help="prompt tokens (default: 512)")
    demo.add_argument(
        "--new-tokens", type=_positive_int, default=32, help="tokens generated per strategy (default: 32)"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the model weights and the prompt (default: 0)")
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default: 1; a model this small is fastest, and timed most steadily, on one)",
    )
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.add_argument(
        "--quiet", action="store_true", help="no progress messages or explanations: the table and a one-line caveat"
    )
    demo.set_defaults(handler=_cmd_demo)
    return parser


# -- strategies ----------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    """A short readable name of a field's type annotation."""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _description(cls: type) -> str:
    """The first line of the class's own docstring (not an inherited one)."""
    doc = cls.__doc__
    return inspect.cleandoc(doc).splitlines()[0] if doc and doc.strip() else "(no description)"


def strategy_records() -> list[dict[str, Any]]:
    """Every registered strategy as a JSON-serialisable dict, sorted by name."""
    from kvpress_mm.registry import strategy_infos

    records = []
    for info in strategy_infos():
        fields = {}
        for name, field in info.cls.model_fields.items():
            fields[name] = {
                "type": _type_name(field.annotation),
                "default": None if field.is_required() else field.default,
                "required": field.is_required(),
                "description": field.description or "",
            }
        records.append(
            {
                "name": info.name,
                "origin": info.origin,
                "builtin": info.builtin,
                "class": f"{info.cls.__module__}.{info.cls.__qualname__}",
                "description": _description(info.cls),
                "config": fields,
            }
        )
    return records


def _cmd_strategies(args: argparse.Namespace) -> int:
    records = strategy_records()
    if args.json:
        print(json.dumps(records, indent=2, default=str))
        return 0
    for record in records:
        print(f"{record['name']}  [{record['origin']}]")
        print(f"    {record['description'].replace('``', '`')}")
        for name, field in record["config"].items():
            default = "(required)" if field["required"] else f"= {field['default']!r}"
            print(f"    {name}: {field['type']} {default}  {field['description']}".rstrip())
        print()
    builtin = sum(r["builtin"] for r in records)
    print(f"{len(records)} strategies ({builtin} built-in, {len(records) - builtin} from plugins).")
    print('Use one: Compressor.from_name("<name>", compression_ratio=0.8, ...)')
    return 0


# -- demo ----------------------------------------------------------------------------------


SHORT_NOTE = "random-weight model: memory/speed mechanics and agreement, not answer quality"

DEMO_LEGEND = (
    "KV before/after: the prompt's cache before and after compression (session.report). KV at end: after "
    "generation (h2o evicts while decoding, so it stays at its budget). agreement: generated tokens identical "
    "to full's, position by position; same prefix: leading tokens identical to full's. A random model's greedy "
    "continuation is chaotic: it diverges early under any change of the cache, and the differences between "
    "strategies here say nothing about which is better on a trained model. On a model this small a decode "
    "step's time is mostly fixed per-step overhead, so a smaller cache barely changes it here."
)


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=100, break_on_hyphens=False)


def _kib(n_bytes: int) -> str:
    return f"{n_bytes / 1024:,.0f}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _demo_strategies(requested: list[str] | None) -> list[str]:
    from kvpress_mm.demo import DEFAULT_STRATEGIES
    from kvpress_mm.registry import list_strategies

    if requested is None:
        return list(DEFAULT_STRATEGIES)
    if "all" in requested:
        return list_strategies()
    return requested


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from kvpress_mm.demo import DemoModelConfig, run_demo

    torch.set_num_threads(args.threads)

    def progress(message: str) -> None:
        print(f"[{PROG} demo] {message}", file=sys.stderr, flush=True)

    result = run_demo(
        strategies=_demo_strategies(args.strategies),
        compression_ratio=args.ratio,
        prompt_length=args.prompt_length,
        new_tokens=args.new_tokens,
        model_config=DemoModelConfig(seed=args.seed),
        progress=None if args.quiet or args.json else progress,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    headers = [
        "strategy",
        "KV before KiB",
        "KV after KiB",
        "kept",
        "KV at end KiB",
        "decode ms/tok",
        "agreement",
        "same prefix",
    ]
    rows = [
        [
            row.strategy,
            _kib(row.kv_bytes_before),
            _kib(row.kv_bytes_after),
            f"{row.kept_fraction:.0%}",
            _kib(row.kv_bytes_end),
            f"{row.decode_ms_per_token:.2f}",
            f"{row.agreement:.0%}",
            f"{row.matching_prefix}/{result.new_tokens}",
        ]
        for row in result.rows
    ]
    if args.quiet:
        print(render_table(headers, rows))
        print(f"({SHORT_NOTE})")
        return 0
    print(_wrap(f"NOTE: {result.note}"))
    print(_wrap(f"model: {result.model}"))
    print(
        _wrap(
            f"prompt: {result.prompt_length} random tokens; greedy generation of {result.new_tokens} tokens; "
            f"compression ratio {result.compression_ratio:g} (each layer keeps int(L * (1 - r)) of its L entries)"
        )
    )
    print()
    print(render_table(headers, rows))
    print()
    print(_wrap(DEMO_LEGEND))
    return 0


# -- entry point ---------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    """An error as one line (a pydantic ValidationError's field errors joined)."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()]
        return f"invalid {error.title} config: " + "; ".join(parts)
    return " ".join(str(error).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvpress-mm`` console script; returns the exit code."""
    from pydantic import ValidationError

    from kvpress_mm.errors import KVPressMMError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: strategies, demo")
    try:
        code: int = args.handler(args)
    except (KVPressMMError, ValidationError) as error:
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1
    except BrokenPipeError:  # the reader went away (`kvpress-mm strategies | head`): not an error
        sys.stdout = open(os.devnull, "w")  # keeps the interpreter's final flush quiet
        return 0
    return code
