"""``full``: no compression, the reference arm of every comparison."""

from __future__ import annotations

from typing import Any

from kvpress_mm.compressor import Compressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.selection import keep_everything
from kvpress_mm.ops.views import LayerView


class Full(Compressor):
    """Keeps every entry, whatever ``compression_ratio`` says.

    Cache and output are exactly those of running without a compressor.
    """

    @property
    def is_noop(self) -> bool:
        """Always True."""
        return True

    def plan(self, layer: LayerView) -> CompressionPlan:
        """Keep everything (the session never calls it: no-op strategies leave the cache alone)."""
        return keep_everything(layer)


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``full``."""
    register("full", Full)
