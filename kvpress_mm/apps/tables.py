"""Plain-text output helpers for the commands: aligned tables, wrapped paragraphs, byte sizes."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A plain-text table: the first ``left`` columns left-aligned (labels), the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def wrap(text: str, width: int = 100) -> str:
    """``text`` wrapped at ``width`` columns (words are never split at hyphens)."""
    return textwrap.fill(text, width=width, break_on_hyphens=False)


def kib(n_bytes: int) -> str:
    """Bytes as KiB with thousands separators: ``1,024``."""
    return f"{n_bytes / 1024:,.0f}"


def human_bytes(n_bytes: float) -> str:
    """Bytes in the largest unit that keeps the number at least 1: ``12.3 MiB``."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} GiB"


def json_safe(value: Any) -> Any:
    """``value`` with every NaN float replaced by ``None`` (strict JSON has no NaN), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
