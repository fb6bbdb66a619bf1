"""A plugin that passes the wrong things to ``register``."""

from typing import Any

from kvpress_mm import hookimpl


class NotACompressor:
    """A plain class, not a kvpress_mm.Compressor subclass."""


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    register("not-a-strategy", NotACompressor)


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    register("not an adapter")
