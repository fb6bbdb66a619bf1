"""Reports: the machine and source a run measured on, medians and ratios, table cells, the JSON, the command line."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse


def source_revision(directory: Path) -> str:
    """The git commit of the source tree at ``directory`` (``+modified`` if it has changes), else ``unknown``.

    What ran, without the machine's path (results are committed to the docs).
    """
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+modified" if changes else commit


def machine_info(*, source_tree: bool = False, interop_threads: bool = False) -> dict[str, Any]:
    """Versions, threads and load: what the times depend on.

    ``source_tree`` adds ``kvpress_mm``, the git commit of the kvpress_mm that ran
    (:func:`source_revision`), first; ``interop_threads`` adds ``torch_interop_threads`` after
    ``torch_threads``. The two options keep each benchmark's JSON as it was (decode and
    kvpress_compare report the source tree, prefill_decode the inter-op threads).
    """
    import torch
    import transformers

    info: dict[str, Any] = {}
    if source_tree:
        import kvpress_mm

        info["kvpress_mm"] = source_revision(Path(kvpress_mm.__file__).parent)
    info.update(
        python=platform.python_version(),
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        torch_threads=torch.get_num_threads(),
    )
    if interop_threads:
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    # read last: the load average at the end of the run, what it was measured under
    info["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return info


def median_or_none(values: list[float]) -> float | None:
    """The median of ``values``, None when there are none (an arm that did not run)."""
    return statistics.median(values) if values else None


def ratio_or_none(a: float | None, b: float | None) -> float | None:
    """``a / b``, None when either is missing or ``b`` is 0."""
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str, *, align_dash: bool = False) -> str:
    """``value`` formatted with ``spec``, or a dash when it is missing.

    ``align_dash``: the dash right-aligned to the spec's width (``"8.1f"``: 8 characters), so that
    fixed-width table columns stay aligned; otherwise a bare ``-`` (Markdown cells, free text).
    """
    if value is None:
        width = spec.split(".")[0]
        return format("-", ">" + width) if align_dash and width.isdigit() else "-"
    return format(value, spec)


def column(value: float | None, spec: str) -> str:
    """A fixed-width table's cell: :func:`fmt` with the dash as wide as the spec's width."""
    return fmt(value, spec, align_dash=True)


def verdict(met: bool | None) -> str:
    """``PASS`` or ``MISS`` for a target met or missed; empty when it was not judged."""
    return "" if met is None else ("PASS" if met else "MISS")


def md_table(header: list[str], rows: list[list[str]], text: tuple[int, ...] = (0,)) -> list[str]:
    """A Markdown table's lines; the columns at the indices ``text`` are left-aligned, the others numbers."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i in text else "--:" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def rounded(value: Any, digits: int = 5) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (a smaller JSON file)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def write_json(path: Path, data: Any, indent: int) -> None:
    """``data`` as JSON in ``path`` (its directory created), ending with a newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n")


def config_values(config_type: Any, args: argparse.Namespace, *, given_only: bool = False) -> dict[str, Any]:
    """The fields of the dataclass ``config_type`` that the command line has an option of the same name for.

    Lists become tuples (a config is immutable); ``given_only``: only the options given (not None).
    """
    import dataclasses

    values = {}
    for field in dataclasses.fields(config_type):
        value = getattr(args, field.name, None)
        if hasattr(args, field.name) and not (given_only and value is None):
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return values


def argument_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The ``argparse`` parser of ``python -m module``, described by the first line of its docstring ``doc``."""
    import argparse

    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0] if doc else None)
