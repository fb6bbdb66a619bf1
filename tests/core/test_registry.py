"""The strategy registry and the pluggy plugin system (built-ins and real entry-point plugins).

Third-party plugins are real distributions: each scenario folder under ``tests/plugins/`` holds
``<name>-0.1.dist-info/`` (METADATA + entry_points.txt) and the plugin module. A test puts the
folder on ``sys.path`` and lets ``importlib.metadata`` discover it; nothing is registered by hand.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest
import torch

import kvpress_mm
from kvpress_mm import Compressor, ScoredCompressor, hookimpl, hookspecs, list_strategies
from kvpress_mm.adapters.base import ModelAdapter
from kvpress_mm.adapters.generic import TextDecoderAdapter
from kvpress_mm.errors import DuplicateStrategyError, KVPressMMError, UnknownStrategyError
from kvpress_mm.registry import (
    DISABLE_AUTOLOAD_ENV,
    ENTRY_POINT_GROUP,
    PluginWarning,
    find_adapter,
    get_registry,
    registered_adapters,
    reset_registry,
    strategy_infos,
)

PLUGINS = Path(__file__).parent / "plugins"

#: every built-in strategy and wrapper: name -> module under kvpress_mm
BUILTINS = {
    "full": "strategies.full",
    "random": "strategies.random",
    "streaming": "strategies.streaming",
    "h2o": "strategies.h2o",
    "snapkv": "strategies.snapkv",
    "lookm-evict": "strategies.lookm_evict",
    "lookm-average": "strategies.lookm_average",
    "lookm-pivotal": "strategies.lookm_pivotal",
    "lookm-weighted": "strategies.lookm_weighted",
    "tova": "strategies.tova",
    "knorm": "strategies.knorm",
    "vl-cache": "strategies.vl_cache",
    "pyramid": "wrappers.pyramid",
    "modality-budget": "wrappers.modality_budget",
    "mixkv": "wrappers.mixkv",
    "adakv": "wrappers.adakv",
    "decoding": "wrappers.decoding",
    "chunked-prefill": "wrappers.chunked_prefill",
}

# every module the plugin fixtures define; dropped from sys.modules after each test
PLUGIN_MODULES = {path.stem for path in PLUGINS.glob("*/*.py")}


@pytest.fixture(autouse=True)
def only_fixture_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entry-point discovery sees the ``tests/plugins`` distributions a test installs, nothing else.

    Plugins really installed in the environment (CI installs ``examples/kvpress-mm-keynorm``,
    which also registers ``keynorm``) would otherwise join every list these tests compare and
    clash with the ``good`` fixture. Discovery itself is unchanged: only the environment's own
    distributions are filtered out of ``importlib.metadata.entry_points``.
    """
    real_entry_points = importlib.metadata.entry_points

    def from_fixtures(entry_point: importlib.metadata.EntryPoint) -> bool:
        dist = entry_point.dist
        return dist is not None and Path(str(dist.locate_file(""))).resolve().is_relative_to(PLUGINS.resolve())

    def entry_points(**params: Any) -> importlib.metadata.EntryPoints:
        found = real_entry_points(**params)
        if params.get("group") != ENTRY_POINT_GROUP:
            return found
        return importlib.metadata.EntryPoints(ep for ep in found if from_fixtures(ep))

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts and ends with a fresh registry and no plugin module imported."""
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    reset_registry()
    yield
    reset_registry()
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


@pytest.fixture
def no_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the built-ins: whatever is installed in the environment is not discovered."""
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    reset_registry()


def install(monkeypatch: pytest.MonkeyPatch, *scenarios: str) -> None:
    """Make the distributions of ``tests/plugins/<scenario>`` discoverable, as if pip-installed."""
    for scenario in scenarios:
        folder = PLUGINS / scenario
        assert any(folder.glob("*.dist-info/entry_points.txt")), f"{folder} holds no distribution"
        monkeypatch.syspath_prepend(str(folder))
    importlib.invalidate_caches()
    reset_registry()


def origin_of(name: str) -> str:
    return next(info.origin for info in strategy_infos() if info.name == name)


def tiny_llama() -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def cache_keys(cache: object) -> list[torch.Tensor]:
    """``[batch, kv_heads, seq, head_dim]`` keys of each layer of a transformers cache."""
    return [layer.keys for layer in cache.layers]  # type: ignore[attr-defined]


# -- public names ------------------------------------------------------------------------------


def test_public_names_are_exported() -> None:
    assert kvpress_mm.Compressor is Compressor
    assert kvpress_mm.ScoredCompressor is ScoredCompressor
    assert kvpress_mm.list_strategies is list_strategies
    assert kvpress_mm.hookimpl is hookspecs.hookimpl
    for name in ("Compressor", "ScoredCompressor", "hookimpl", "list_strategies"):
        assert name in kvpress_mm.__all__
    assert issubclass(ScoredCompressor, Compressor)
    assert ENTRY_POINT_GROUP == "kvpress_mm"
    assert DISABLE_AUTOLOAD_ENV == "KVPRESS_MM_DISABLE_PLUGIN_AUTOLOAD"


def test_hookimpl_is_the_kvpress_mm_pluggy_marker() -> None:
    assert isinstance(hookimpl, pluggy.HookimplMarker)
    assert hookimpl.project_name == "kvpress_mm"

    @hookimpl
    def kvpress_mm_register_strategies(register: object) -> None:
        """Marked."""

    assert hasattr(kvpress_mm_register_strategies, "kvpress_mm_impl")


def test_hook_specs_take_a_register_callback() -> None:
    manager = pluggy.PluginManager("kvpress_mm")
    manager.add_hookspecs(hookspecs)
    for hook_name in ("kvpress_mm_register_strategies", "kvpress_mm_register_adapters"):
        assert getattr(manager.hook, hook_name).spec is not None, hook_name
        assert list(inspect.signature(getattr(hookspecs, hook_name)).parameters) == ["register"]


# -- built-ins ---------------------------------------------------------------------------------


def test_list_strategies_is_exactly_the_builtins_without_autoload(no_autoload: None) -> None:
    assert list_strategies() == sorted(BUILTINS)
    assert len(list_strategies()) == 18


# the built-in adapter modules in the order they are tried: by name, the fallback (generic) last
ADAPTER_MODULES = (
    "internvl",
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_5_vl",
    "qwen2_vl",
    "qwen3_vl",
    "generic",
)


def test_builtins_register_through_the_plugin_hooks(no_autoload: None) -> None:
    infos = {info.name: info for info in strategy_infos()}
    assert set(infos) == set(BUILTINS)
    for name, module in BUILTINS.items():
        info = infos[name]
        assert info.origin == f"built-in (kvpress_mm.{module})"
        assert info.builtin
        assert issubclass(info.cls, Compressor)
        assert info.cls.__module__ == f"kvpress_mm.{module}"
    # the built-in modules are pluggy plugins with real hook implementations
    manager = get_registry().manager
    impls = manager.hook.kvpress_mm_register_strategies.get_hookimpls()
    assert {impl.plugin_name for impl in impls} == {f"kvpress_mm.{m}" for m in BUILTINS.values()}
    adapters = registered_adapters()
    # one adapter per family, the generic text adapter last (it is the fallback)
    assert type(adapters[-1].adapter) is TextDecoderAdapter
    assert adapters[-1].origin == "built-in (kvpress_mm.adapters.generic)"
    families = [a.origin for a in adapters]
    assert families == [f"built-in (kvpress_mm.adapters.{m})" for m in ADAPTER_MODULES]


def test_from_name_builds_every_builtin(no_autoload: None) -> None:
    for name in BUILTINS:
        compressor = Compressor.from_name(name, compression_ratio=0.25)
        assert isinstance(compressor, Compressor)
        assert compressor.compression_ratio == 0.25
        assert compressor.name == name
        assert compressor.to_config()["strategy"] == name


def test_registry_is_loaded_once_and_reset_reloads(no_autoload: None) -> None:
    first = get_registry()
    assert get_registry() is first
    list_strategies()
    assert get_registry() is first
    reset_registry()
    assert get_registry() is not first


def test_unknown_strategy_lists_names_and_suggests_close_matches(no_autoload: None) -> None:
    with pytest.raises(UnknownStrategyError) as caught:
        Compressor.from_name("lookm-pivotl")
    error = caught.value
    assert isinstance(error, ValueError)
    assert isinstance(error, KVPressMMError)
    message = str(error)
    assert "'lookm-pivotl'" in message
    assert re.search(r"[Dd]id you mean 'lookm-pivotal'", message), message
    for name in BUILTINS:
        assert name in message


def test_unknown_strategy_without_close_match_still_lists_names(no_autoload: None) -> None:
    with pytest.raises(UnknownStrategyError) as caught:
        Compressor.from_name("zzzzzz")
    message = str(caught.value)
    assert "did you mean" not in message.lower()
    assert all(name in message for name in BUILTINS)


def test_unknown_strategy_suggests_case_variants(no_autoload: None) -> None:
    with pytest.raises(UnknownStrategyError, match=r"[Dd]id you mean 'snapkv'"):
        Compressor.from_name("SnapKV")
    with pytest.raises(UnknownStrategyError, match=r"[Dd]id you mean 'h2o'"):
        Compressor.from_name("H2O")


# -- autoload switch ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_disable_autoload_env_turns_discovery_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    install(monkeypatch, "good")
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, value)
    reset_registry()
    assert list_strategies() == sorted(BUILTINS)
    assert "kvpress_keynorm" not in sys.modules  # not even imported
    with pytest.raises(UnknownStrategyError):
        Compressor.from_name("keynorm")


def test_autoload_stays_on_when_env_is_not_truthy(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "good")
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "0")
    reset_registry()
    assert "keynorm" in list_strategies()


# -- (a) a good plugin -------------------------------------------------------------------------


def test_good_plugin_is_discovered_with_its_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "good")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        names = list_strategies()
    assert names == sorted([*BUILTINS, "keynorm"])
    info = next(info for info in strategy_infos() if info.name == "keynorm")
    assert not info.builtin
    assert "keynorm" in info.origin
    assert "kvpress_keynorm" in info.origin  # the module
    assert "kvpress-keynorm" in info.origin  # the distribution
    assert "0.1" in info.origin
    assert info.cls.__module__ == "kvpress_keynorm"
    assert issubclass(info.cls, ScoredCompressor)
    # the built-ins are untouched
    assert all(origin_of(name).startswith("built-in (") for name in BUILTINS)


def test_good_plugin_strategy_builds_and_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "good")
    compressor = Compressor.from_name("keynorm", compression_ratio=0.75)
    assert type(compressor).__name__ == "KeyNorm"
    assert repr(compressor) == "KeyNorm(compression_ratio=0.75)"
    assert compressor.name == "keynorm"
    config = compressor.to_config()
    assert config == {"strategy": "keynorm", "compression_ratio": 0.75}
    assert Compressor.from_config(config) == compressor
    assert type(compressor).model_validate_json(compressor.model_dump_json()) == compressor


def test_good_plugin_compresses_a_tiny_llama(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "good")
    model = tiny_llama()
    length, ratio = 16, 0.5
    n_keep = int(length * (1 - ratio))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 256, (1, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)

    with torch.no_grad():
        full_keys = cache_keys(model(input_ids, attention_mask=attention_mask, use_cache=True).cache)
    compressor = Compressor.from_name("keynorm", compression_ratio=ratio)
    with torch.no_grad(), compressor(model) as session:
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=1,
            do_sample=False,
            return_dict_in_generate=True,
        )
    compressed = cache_keys(out.cache)
    assert len(compressed) == 2
    for layer, (keys, full) in enumerate(zip(compressed, full_keys)):
        assert keys.shape == (1, 2, n_keep, 16), layer
        # keynorm keeps, per KV head, the n_keep keys of smallest norm (in prompt order)
        for head in range(2):
            expected = (-full[0, head].norm(dim=-1)).topk(n_keep).indices.sort().values
            torch.testing.assert_close(keys[0, head], full[0, head, expected])
    assert session.report.layers_compressed == 2
    assert session.report.n_keep == (n_keep,)
    assert session.report.kv_bytes_after < session.report.kv_bytes_before


# -- (b) duplicate names -----------------------------------------------------------------------


def test_plugin_reusing_a_builtin_name_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "duplicate_builtin")
    with pytest.raises(DuplicateStrategyError) as caught:
        list_strategies()
    error = caught.value
    assert isinstance(error, ValueError)
    message = str(error)
    assert "'h2o'" in message
    assert "built-in (kvpress_mm.strategies.h2o)" in message  # first origin
    assert "kvpress-fake-h2o" in message and "kvpress_fake_h2o" in message  # second origin
    # the clash is reported every time, not swallowed after the first attempt
    with pytest.raises(DuplicateStrategyError):
        Compressor.from_name("h2o")


def test_two_plugins_registering_one_name_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "duplicate_pair")
    with pytest.raises(DuplicateStrategyError) as caught:
        list_strategies()
    message = str(caught.value)
    assert "'twin'" in message
    assert "kvpress-twin-a" in message and "kvpress_twin_a" in message
    assert "kvpress-twin-b" in message and "kvpress_twin_b" in message


def test_duplicate_goes_away_when_the_plugin_does(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        install(patch, "duplicate_builtin")
        with pytest.raises(DuplicateStrategyError):
            list_strategies()
    importlib.invalidate_caches()
    reset_registry()
    assert list_strategies() == sorted(BUILTINS)
    assert origin_of("h2o") == "built-in (kvpress_mm.strategies.h2o)"


# -- (c) a plugin that fails to import -----------------------------------------------------------


def test_plugin_failing_to_import_warns_and_builtins_keep_working(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "broken_import")
    with pytest.warns(PluginWarning) as record:
        names = list_strategies()
    assert names == sorted(BUILTINS)
    assert len(record) == 1
    message = str(record[0].message)
    assert "'broken'" in message  # the entry point
    assert "kvpress_broken" in message  # the module
    assert "kvpress-broken" in message  # the distribution
    assert "failed to import" in message
    assert "ModuleNotFoundError" in message
    assert "kvpress_mm_test_dependency_that_is_not_installed" in message
    assert issubclass(PluginWarning, UserWarning)
    # built-ins still build
    assert Compressor.from_name("snapkv", compression_ratio=0.5).name == "snapkv"


def test_broken_plugin_does_not_hide_a_good_one(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "broken_import", "good")
    with pytest.warns(PluginWarning, match="kvpress_broken"):
        names = list_strategies()
    assert names == sorted([*BUILTINS, "keynorm"])


# -- (d) a plugin whose hook raises ----------------------------------------------------------------


def test_plugin_raising_in_its_hook_warns_and_keeps_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "raising_hook")
    with pytest.warns(PluginWarning) as record:
        names = list_strategies()
    assert names == sorted(BUILTINS)  # "half-registered" is not kept
    assert len(record) == 1
    message = str(record[0].message)
    assert "'raising'" in message and "kvpress-raising" in message and "kvpress_raising" in message
    assert "kvpress_mm_register_strategies" in message
    assert "RuntimeError" in message and "exploded while registering" in message
    with pytest.raises(UnknownStrategyError):
        Compressor.from_name("half-registered")
    assert Compressor.from_name("h2o").name == "h2o"


def test_plugin_registering_wrong_objects_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "bad_registration")
    with pytest.warns(PluginWarning) as record:
        names = list_strategies()
        adapters = registered_adapters()
    assert names == sorted(BUILTINS)
    # nothing from the bad plugin: exactly the built-in adapters
    assert [a.origin for a in adapters] == [f"built-in (kvpress_mm.adapters.{m})" for m in ADAPTER_MODULES]
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    strategies_msg = next(m for m in messages if "kvpress_mm_register_strategies" in m)
    adapters_msg = next(m for m in messages if "kvpress_mm_register_adapters" in m)
    for message in messages:
        assert "kvpress-bad-registration" in message
    assert "'not-a-strategy'" in strategies_msg and "Compressor subclass" in strategies_msg
    assert "ModelAdapter" in adapters_msg


def test_plugin_with_a_mismatched_hook_signature_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "bad_signature")
    with pytest.warns(PluginWarning) as record:
        names = list_strategies()
    assert names == sorted(BUILTINS)
    assert len(record) == 1
    message = str(record[0].message)
    assert "kvpress-bad-signature" in message and "kvpress_bad_signature" in message
    assert "registry" in message  # the argument the spec does not have


# -- (f) adapters from plugins ------------------------------------------------------------------


def test_plugin_adapter_is_tried_before_the_builtins(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "adapter")
    adapters = registered_adapters()
    assert len(adapters) == 1 + len(ADAPTER_MODULES)
    plugin, builtin = adapters[0], adapters[-1]
    assert [a.origin for a in adapters[1:]] == [f"built-in (kvpress_mm.adapters.{m})" for m in ADAPTER_MODULES]
    assert type(plugin.adapter).__name__ == "MyLlamaAdapter"
    assert isinstance(plugin.adapter, ModelAdapter)
    assert "kvpress-my-adapter" in plugin.origin and "kvpress_my_adapter" in plugin.origin
    assert not plugin.origin.startswith("built-in")
    assert type(builtin.adapter) is TextDecoderAdapter
    assert builtin.origin == "built-in (kvpress_mm.adapters.generic)"
    # the plugin's adapter claims the Llama model that the built-in would also claim
    model = tiny_llama()
    assert find_adapter(model) is plugin.adapter
    assert list_strategies() == sorted(BUILTINS)  # the adapter plugin adds no strategy


def test_plugin_adapter_drives_a_compression_session(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "adapter")
    adapter = registered_adapters()[0].adapter
    used: list[str] = []
    original = adapter.attention_modules

    def spy(model: torch.nn.Module) -> list[torch.nn.Module]:
        used.append(type(model).__name__)
        return original(model)

    monkeypatch.setattr(adapter, "attention_modules", spy)
    model = tiny_llama()
    input_ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), Compressor.from_name("streaming", compression_ratio=0.5)(model):
        out = model(input_ids, use_cache=True)
    assert "LlamaForCausalLM" in used
    assert all(keys.shape[2] == 6 for keys in cache_keys(out.cache))


def test_builtin_strategy_names_are_the_registered_builtins() -> None:
    """The one list of built-in names the commands use matches what the built-in plugins register."""
    from kvpress_mm import list_strategies
    from kvpress_mm.strategies import BUILTIN_STRATEGIES, LAYER_ADAPTIVE_STRATEGIES
    from kvpress_mm.wrappers import BUILTIN_WRAPPERS

    assert len(set(BUILTIN_STRATEGIES)) == len(BUILTIN_STRATEGIES) == 12
    assert len(set(BUILTIN_WRAPPERS)) == len(BUILTIN_WRAPPERS) == 6
    assert set(BUILTIN_STRATEGIES) | set(BUILTIN_WRAPPERS) <= set(list_strategies())
    assert set(LAYER_ADAPTIVE_STRATEGIES) <= set(BUILTIN_STRATEGIES)
