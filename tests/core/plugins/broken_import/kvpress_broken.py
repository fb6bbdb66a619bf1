"""A plugin whose module fails to import: it needs a dependency that is not installed."""

from typing import Any

import kvpress_mm_test_dependency_that_is_not_installed  # noqa: F401

from kvpress_mm import hookimpl


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    raise AssertionError("never reached: the module does not import")
