"""Plugin hook specifications (pluggy). Built-ins register through the same hooks."""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("kvpress_mm")
hookimpl = pluggy.HookimplMarker("kvpress_mm")


@hookspec
def kvpress_mm_register_strategies(register: Any) -> None:
    """Call ``register(name, cls)`` for each strategy class (a :class:`~kvpress_mm.Compressor` subclass)."""


@hookspec
def kvpress_mm_register_adapters(register: Any) -> None:
    """Call ``register(adapter)`` for each model-family adapter (a :class:`~kvpress_mm.adapters.ModelAdapter`)."""
