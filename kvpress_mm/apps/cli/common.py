"""What every command does besides parsing: progress lines, threads, devices, JSON output, strategy lists."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kvpress_mm.apps.cli.parsers import PROG


def progress(args: argparse.Namespace, command: str) -> Callable[[str], None]:
    """A function printing ``[kvpress-mm COMMAND] message`` on stderr, silent under ``--quiet``."""

    def report(message: str) -> None:
        if not args.quiet:
            print(f"[{PROG} {command}] {message}", file=sys.stderr, flush=True)

    return report


def prepare_runtime(args: argparse.Namespace) -> None:
    """Threads, and transformers' own logging and progress bars kept off our output."""
    import torch
    from transformers.utils import logging as hf_logging

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def strategy_names(requested: list[str] | None, default: Sequence[str]) -> list[str]:
    """The names a ``--strategies`` option asks for: ``default`` when absent, every registered one for ``all``."""
    from kvpress_mm.registry import list_strategies

    if requested is None:
        return list(default)
    if "all" in requested:
        return list_strategies()
    return requested


def default_device() -> str:
    """The GPU of this process (``LOCAL_RANK`` under a launcher) when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def dumps(data: Any) -> str:
    """JSON text of a result (NaN and infinities as null, tuples as lists)."""
    from kvpress_mm.apps.tables import json_safe

    return json.dumps(json_safe(data), indent=2, default=str, allow_nan=False)
