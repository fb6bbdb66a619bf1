"""``kvpress-mm strategies``: every registered strategy with its origin, description and config."""

from __future__ import annotations

import argparse
import inspect
import json
from typing import Any

from kvpress_mm.apps.cli.parsers import FORMATTER, PROG
from kvpress_mm.registry import strategy_infos

EPILOG = f"""examples:
  {PROG} strategies                 one block per strategy: origin, description, config defaults
  {PROG} strategies --json          the same as a JSON list
  {PROG} strategies --json | python -c "import json,sys; print([s['name'] for s in json.load(sys.stdin)])"
"""


def add_parser(commands: Any) -> None:
    """Add ``strategies`` to the subcommands ``commands``."""
    strategies = commands.add_parser(
        "strategies",
        help="list the registered strategies (built-in and plugin)",
        description="List every registered strategy: its origin, one-line description and config defaults.",
        epilog=EPILOG,
        formatter_class=FORMATTER,
    )
    strategies.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    strategies.set_defaults(handler=command)


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


def command(args: argparse.Namespace) -> int:
    """Run ``kvpress-mm strategies``; returns the exit code."""
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
