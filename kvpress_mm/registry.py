"""The strategy and adapter registry: built-ins and third-party plugins, through pluggy.

Third-party distributions advertise a plugin module in the entry-point group ``kvpress_mm``;
the module defines ``kvpress_mm_register_strategies`` / ``kvpress_mm_register_adapters``
marked with :data:`kvpress_mm.hookimpl`. Discovery is lazy (on first use) and can be turned
off with ``KVPRESS_MM_DISABLE_PLUGIN_AUTOLOAD=1``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import pkgutil
import warnings
from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from kvpress_mm import hookspecs
from kvpress_mm.adapters.base import ModelAdapter
from kvpress_mm.errors import DuplicateStrategyError, UnknownStrategyError, UnsupportedModelError

if TYPE_CHECKING:
    from torch import nn

ENTRY_POINT_GROUP = "kvpress_mm"
"""Entry-point group where distributions advertise plugin modules (``[project.entry-points.kvpress_mm]``)."""

DISABLE_AUTOLOAD_ENV = "KVPRESS_MM_DISABLE_PLUGIN_AUTOLOAD"
"""Environment variable: ``1`` / ``true`` / ``yes`` loads the built-ins only, no installed plugin."""

#: The packages whose modules are kvpress-mm's own plugins: every module in them that implements a
#: hook is registered before any installed plugin, so adding a strategy or an adapter is adding a file.
BUILTIN_PACKAGES = ("kvpress_mm.strategies", "kvpress_mm.wrappers", "kvpress_mm.adapters")


def builtin_plugin_modules() -> tuple[str, ...]:
    """The modules of :data:`BUILTIN_PACKAGES` that implement a hook, by package then name."""
    found = []
    for package_name in BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name):
            module_name = f"{package_name}.{info.name}"
            module = importlib.import_module(module_name)
            if any(callable(getattr(module, hook, None)) for hook in HOOK_NAMES):
                found.append(module_name)
    return tuple(found)


#: The hooks a plugin module may implement (see :mod:`kvpress_mm.hookspecs`).
HOOK_NAMES = ("kvpress_mm_register_strategies", "kvpress_mm_register_adapters")


class StrategyClass(ABC):  # noqa: B024 - a marker: classes register, nothing is implemented
    """What the registry accepts as a strategy: :class:`kvpress_mm.Compressor` and its subclasses.

    :mod:`kvpress_mm.compressor` registers ``Compressor`` here (``StrategyClass.register``), so
    that ``issubclass(cls, StrategyClass)`` holds exactly for strategy classes while the
    registry, which the compressor uses, does not import the compressor.
    """


class PluginWarning(UserWarning):
    """A plugin failed to import or raised in its hook; it was skipped."""


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy: its name, class and where it came from."""

    name: str
    cls: type[Any]  # a kvpress_mm.Compressor subclass (a StrategyClass)
    origin: str

    @property
    def builtin(self) -> bool:
        """True for the strategies shipped with kvpress-mm."""
        return self.origin.startswith("built-in")


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter and where it came from."""

    adapter: ModelAdapter
    origin: str


class Registry:
    """Strategies and adapters collected from the built-in plugins and the installed ones."""

    def __init__(self, autoload: bool | None = None) -> None:
        if autoload is None:
            autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in {"1", "true", "yes"}
        self.manager = pluggy.PluginManager("kvpress_mm")
        self.manager.add_hookspecs(hookspecs)
        self._origins: dict[str, str] = {}
        self._builtins = builtin_plugin_modules()
        for module_name in self._builtins:
            self.manager.register(importlib.import_module(module_name), name=module_name)
            self._origins[module_name] = f"built-in ({module_name})"
        if autoload:
            self._load_entry_points()
        self.strategies: dict[str, StrategyInfo] = {}
        self.adapters: list[AdapterInfo] = []
        self._collect("kvpress_mm_register_strategies", self._add_strategy)
        self._collect("kvpress_mm_register_adapters", self._add_adapter)

    def _load_entry_points(self) -> None:
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = entry_point.dist
            dist_text = f"distribution {dist.name} {dist.version}" if dist is not None else "unknown distribution"
            origin = f"plugin {entry_point.name!r} (module {entry_point.value}, {dist_text})"
            try:
                module = entry_point.load()
            except Exception as error:  # a broken plugin must not break kvpress-mm
                warnings.warn(
                    f"kvpress_mm {origin} failed to import and was skipped: {type(error).__name__}: {error}",
                    PluginWarning,
                    stacklevel=2,
                )
                continue
            if self.manager.is_registered(module):
                continue
            plugin_name = f"entry-point:{dist.name if dist is not None else '?'}:{entry_point.name}"
            try:
                self.manager.register(module, name=plugin_name)
            except Exception as error:  # e.g. a hook whose signature does not match the spec
                warnings.warn(
                    f"kvpress_mm {origin} could not be registered and was skipped: {type(error).__name__}: {error}",
                    PluginWarning,
                    stacklevel=2,
                )
                continue
            self._origins[plugin_name] = origin

    def _collect(self, hook_name: str, add: Callable[[Any, str, list[Any]], None]) -> None:
        hook = getattr(self.manager.hook, hook_name)
        impls = sorted(hook.get_hookimpls(), key=lambda impl: impl.plugin_name not in self._builtins)
        for impl in impls:
            origin = self._origins.get(impl.plugin_name, f"plugin {impl.plugin_name!r}")
            staged: list[Any] = []

            def register(*args: Any, _origin: str = origin, _staged: list[Any] = staged) -> None:
                add(args, _origin, _staged)

            try:
                impl.function(register=register)
            except DuplicateStrategyError:
                raise
            except Exception as error:
                if impl.plugin_name in self._builtins:
                    raise
                warnings.warn(
                    f"kvpress_mm {origin} raised in {hook_name} and was skipped: {type(error).__name__}: {error}",
                    PluginWarning,
                    stacklevel=2,
                )
                continue
            for item in staged:
                if isinstance(item, StrategyInfo):
                    self.strategies[item.name] = item
                else:
                    self.adapters.append(item)

    def _add_strategy(self, args: Any, origin: str, staged: list[Any]) -> None:
        if len(args) != 2:
            raise TypeError("register(name, cls) takes a strategy name and a Compressor subclass")
        name, cls = args
        if not isinstance(name, str) or not name:
            raise TypeError(f"strategy names must be non-empty strings, got {name!r}")
        if not (isinstance(cls, type) and issubclass(cls, StrategyClass)):
            raise TypeError(f"strategy {name!r} must be a kvpress_mm.Compressor subclass, got {cls!r}")
        clash = self.strategies.get(name) or next((s for s in staged if getattr(s, "name", None) == name), None)
        if clash is not None:
            raise DuplicateStrategyError(
                f"strategy {name!r} is registered twice: by {clash.origin} and by {origin}. "
                "Uninstall one of them or register the plugin's strategy under another name."
            )
        staged.append(StrategyInfo(name, cls, origin))

    def _add_adapter(self, args: Any, origin: str, staged: list[Any]) -> None:
        if len(args) != 1 or not isinstance(args[0], ModelAdapter):
            raise TypeError("register(adapter) takes one kvpress_mm.adapters.ModelAdapter instance")
        staged.append(AdapterInfo(args[0], origin))


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry


def reset_registry() -> None:
    """Forget the loaded registry; the next use discovers plugins again."""
    global _registry
    _registry = None


def list_strategies() -> list[str]:
    """The names of every registered strategy, built-in and plugin, sorted.

    The first call loads the registry: the built-in strategies, then every plugin module
    advertised in the entry-point group ``kvpress_mm`` (unless
    ``KVPRESS_MM_DISABLE_PLUGIN_AUTOLOAD=1``). Each name builds a strategy with
    :meth:`Compressor.from_name <kvpress_mm.Compressor.from_name>`.

    Examples:
        >>> "lookm-pivotal" in list_strategies()
        True
        >>> [name for name in list_strategies() if name.startswith("lookm-")]
        ['lookm-average', 'lookm-evict', 'lookm-pivotal', 'lookm-weighted']

        An installed plugin's names join the built-ins: after
        ``pip install -e examples/kvpress-mm-keynorm``, ``"keynorm" in list_strategies()``.

    """
    return sorted(get_registry().strategies)


def strategy_infos() -> list[StrategyInfo]:
    """Every registered strategy with its class and origin, sorted by name."""
    registry = get_registry()
    return [registry.strategies[name] for name in sorted(registry.strategies)]


def get_strategy(name: str) -> type[Any]:
    """The strategy class registered as ``name``.

    Raises:
        UnknownStrategyError: listing the available names and close matches.

    """
    strategies = get_registry().strategies
    if name in strategies:
        return strategies[name].cls
    available = sorted(strategies)
    # compared case-insensitively: "SnapKV" / "H2O" (the papers' spelling) should point to "snapkv" / "h2o"
    lowered = difflib.get_close_matches(str(name).lower(), [n.lower() for n in available], n=3, cutoff=0.6)
    close = [n for low in dict.fromkeys(lowered) for n in available if n.lower() == low]
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownStrategyError(f"unknown strategy {name!r}.{hint} Available strategies: {', '.join(available)}.")


def strategy_name(cls: type) -> str:
    """The name ``cls`` is registered under (its class name if it is not registered)."""
    for info in get_registry().strategies.values():
        if info.cls is cls:
            return info.name
    return cls.__name__


def registered_adapters() -> list[AdapterInfo]:
    """Adapters in the order they are tried: plugins first, then the built-ins, fallbacks last."""
    adapters = get_registry().adapters

    def rank(info: AdapterInfo) -> tuple[bool, bool]:
        return (info.adapter.fallback, info.origin.startswith("built-in"))

    return sorted(adapters, key=rank)  # stable: registration order within a rank


def find_adapter(model: nn.Module) -> ModelAdapter:
    """The first registered adapter that supports ``model``.

    Raises:
        UnsupportedModelError: naming the supported families.

    """
    adapters = registered_adapters()
    for info in adapters:
        if info.adapter.supports(model):
            return info.adapter
    families = "; ".join(dict.fromkeys(info.adapter.family for info in adapters))
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    raise UnsupportedModelError(
        f"{type(model).__name__} (model_type {model_type!r}) is not supported by any kvpress-mm adapter. "
        f"Supported families: {families}. A plugin can add an adapter through kvpress_mm_register_adapters."
    )
