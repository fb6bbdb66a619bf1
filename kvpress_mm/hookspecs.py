"""Plugin hook specifications (pluggy). Built-ins register through the same hooks.

A plugin is a module that defines one or both hook functions below, marked with
:data:`hookimpl`, and is advertised by its distribution in the entry-point group
``kvpress_mm``:

```toml
# pyproject.toml of the plugin's distribution
[project.entry-points.kvpress_mm]
keynorm = "kvpress_mm_keynorm"
```

Each hook receives a ``register`` callback rather than returning values: one plugin can
register many things, and kvpress-mm validates each registration and rejects duplicate
names in one place (:class:`~kvpress_mm.errors.DuplicateStrategyError`, naming both origins).
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("kvpress_mm")
"""Marker of kvpress-mm's hook specifications (used in this module only)."""

hookimpl = pluggy.HookimplMarker("kvpress_mm")
"""Marker of a plugin's hook implementations; also exported as ``kvpress_mm.hookimpl``.

Examples:
    ```python
    from kvpress_mm import hookimpl

    @hookimpl
    def kvpress_mm_register_strategies(register):
        register("keynorm", KeyNorm)
    ```

"""


@hookspec
def kvpress_mm_register_strategies(register: Any) -> None:
    """Call ``register(name, cls)`` for each strategy class (a :class:`~kvpress_mm.Compressor` subclass).

    ``name`` is what users pass to :meth:`~kvpress_mm.Compressor.from_name`; it must not be
    taken by a built-in or another plugin. A registration that is not a non-empty string and
    a ``Compressor`` subclass is rejected: the plugin is skipped with a
    :class:`~kvpress_mm.registry.PluginWarning` and nothing it registered through this hook is kept.

    Examples:
        ```python
        from kvpress_mm import hookimpl

        @hookimpl
        def kvpress_mm_register_strategies(register):
            register("keynorm", KeyNorm)
            register("keynorm-windowed", KeyNormWindowed)
        ```

    """


@hookspec
def kvpress_mm_register_adapters(register: Any) -> None:
    """Call ``register(adapter)`` for each model-family adapter (a :class:`~kvpress_mm.adapters.ModelAdapter`).

    ``adapter`` is an instance. Adapters from plugins are tried before the built-in ones, so a
    plugin can also take over a family kvpress-mm already supports.

    Examples:
        ```python
        from kvpress_mm import hookimpl

        @hookimpl
        def kvpress_mm_register_adapters(register):
            register(MyFamilyAdapter())
        ```

    """
