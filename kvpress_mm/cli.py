"""The ``kvpress-mm`` command line (placeholder, filled in below)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvpress-mm`` console script."""
    return 0
