"""A plugin whose hook implementation asks for an argument the hook spec does not have."""

from typing import Any

from kvpress_mm import hookimpl


@hookimpl
def kvpress_mm_register_strategies(register: Any, registry: Any) -> None:
    raise AssertionError("never called: pluggy rejects the signature")
