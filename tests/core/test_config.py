"""Strategy configs: pydantic models that validate, print, and round-trip through JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest
import torch

from kvpress_mm import Compressor, ScoredCompressor
from kvpress_mm.errors import UnknownStrategyError
from kvpress_mm.registry import DISABLE_AUTOLOAD_ENV, reset_registry
from kvpress_mm.strategies import BUILTIN_STRATEGIES

LOOKM = ["lookm-evict", "lookm-average", "lookm-pivotal", "lookm-weighted"]

# a non-default value for every field of every built-in
NON_DEFAULT: dict[str, dict[str, Any]] = {
    "full": {"compression_ratio": 0.3},
    "random": {"compression_ratio": 0.7, "seed": 123},
    "streaming": {"compression_ratio": 0.9, "sink_tokens": 0},
    "h2o": {"compression_ratio": 0.0, "window_size": 5, "decode_eviction": False},
    "snapkv": {"compression_ratio": 0.8, "window_size": 16, "kernel_size": 5, "pooling": "avg"},
    **{name: {"compression_ratio": 0.6, "window_size": 0, "keep_all_text": True} for name in LOOKM},
    "tova": {"compression_ratio": 0.7, "head_average": "group", "window_size": 1, "decode_eviction": True},
    "knorm": {"compression_ratio": 0.8, "window_size": 4},
    "vl-cache": {
        "compression_ratio": 0.9,
        "threshold": 0.05,
        "window_ratio": 0.2,
        "min_layer_ratio": 0.0,
        "allocation": "online",
        "shared_heads": True,
        "fallback_window": 8,
    },
}


@pytest.fixture(autouse=True)
def builtins_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Only the built-in strategies, whatever is installed; a fresh registry after each test."""
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    reset_registry()
    yield
    reset_registry()


def configs() -> list[tuple[str, dict[str, Any]]]:
    return [(name, {}) for name in BUILTIN_STRATEGIES] + [(name, NON_DEFAULT[name]) for name in BUILTIN_STRATEGIES]


def assert_names_field(error: BaseException, field: str) -> None:
    """The error is a pydantic ValidationError or a ValueError, and its message names ``field``."""
    assert isinstance(error, (pydantic.ValidationError, ValueError)), type(error)
    assert field in str(error), str(error)
    if isinstance(error, pydantic.ValidationError):
        assert any(field in map(str, e["loc"]) for e in error.errors()), error.errors()


# -- defaults, printing ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_STRATEGIES)
def test_defaults(name: str) -> None:
    compressor = Compressor.from_name(name)
    assert compressor.compression_ratio == 0.5
    assert isinstance(compressor, Compressor)
    assert compressor.name == name


@pytest.mark.parametrize(("name", "config"), configs())
def test_repr_and_str_show_every_field(name: str, config: dict[str, Any]) -> None:
    compressor = Compressor.from_name(name, **config)
    text, shown = repr(compressor), str(compressor)
    assert text.startswith(type(compressor).__name__ + "(")
    for field, value in compressor.model_dump().items():
        assert f"{field}={value!r}" in text, text
        assert f"{field}={value!r}" in shown, shown


def test_repr_is_the_documented_one() -> None:
    assert (
        repr(Compressor.from_name("snapkv", compression_ratio=0.8, window_size=16))
        == "SnapKV(compression_ratio=0.8, window_size=16, kernel_size=7, pooling='max')"
    )


# -- serialisation --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "config"), configs())
def test_json_round_trip(name: str, config: dict[str, Any]) -> None:
    compressor = Compressor.from_name(name, **config)
    cls = type(compressor)
    assert cls.model_validate_json(compressor.model_dump_json()) == compressor
    assert cls.model_validate(compressor.model_dump()) == compressor
    assert cls(**compressor.model_dump()) == compressor
    for field, value in config.items():
        assert getattr(compressor, field) == value


@pytest.mark.parametrize(("name", "config"), configs())
def test_to_config_round_trip(name: str, config: dict[str, Any]) -> None:
    compressor = Compressor.from_name(name, **config)
    saved = compressor.to_config()
    assert saved["strategy"] == name
    assert {k: v for k, v in saved.items() if k != "strategy"} == compressor.model_dump(mode="json")
    restored = Compressor.from_config(saved)
    assert type(restored) is type(compressor)
    assert restored == compressor
    # through a JSON file and back
    text = json.dumps(saved)
    assert Compressor.from_config(json.loads(text)) == compressor
    # from_config does not consume the caller's dict
    assert saved == compressor.to_config()


def test_equality_and_hash_follow_the_config() -> None:
    a = Compressor.from_name("snapkv", compression_ratio=0.8)
    b = Compressor.from_name("snapkv", compression_ratio=0.8)
    c = Compressor.from_name("snapkv", compression_ratio=0.7)
    assert a == b and hash(a) == hash(b)
    assert a != c
    # strategies of different classes are never equal, even with equal fields
    assert Compressor.from_name("lookm-evict") != Compressor.from_name("lookm-pivotal")
    assert len({a, b, c}) == 2


def test_from_config_without_a_strategy_name() -> None:
    with pytest.raises(ValueError, match="strategy"):
        Compressor.from_config({"compression_ratio": 0.5})
    with pytest.raises(UnknownStrategyError, match="[Dd]id you mean 'snapkv'"):
        Compressor.from_config({"strategy": "snapvk", "compression_ratio": 0.5})


def test_from_config_validates_values() -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_config({"strategy": "h2o", "compression_ratio": 2})
    assert_names_field(caught.value, "compression_ratio")


# -- frozen ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_STRATEGIES)
def test_configs_are_frozen(name: str) -> None:
    compressor = Compressor.from_name(name)
    with pytest.raises(pydantic.ValidationError) as caught:
        compressor.compression_ratio = 0.9  # type: ignore[misc]
    assert_names_field(caught.value, "compression_ratio")
    assert compressor.compression_ratio == 0.5
    # a changed copy goes through model_copy, and the original is left alone
    changed = compressor.model_copy(update={"compression_ratio": 0.9})
    assert changed.compression_ratio == 0.9 and compressor.compression_ratio == 0.5


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_STRATEGIES)
@pytest.mark.parametrize("ratio", [1.5, 1.0, -0.1, "abc", math.nan, math.inf, -math.inf, None])
def test_bad_compression_ratio_names_the_field(name: str, ratio: Any) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_name(name, compression_ratio=ratio)
    assert_names_field(caught.value, "compression_ratio")


@pytest.mark.parametrize("ratio", [0, 0.0, 0.25, 0.999])
def test_compression_ratio_bounds_accept(ratio: Any) -> None:
    assert Compressor.from_name("h2o", compression_ratio=ratio).compression_ratio == float(ratio)


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        ("h2o", "window_size", -1),
        *[(name, "window_size", -1) for name in LOOKM],
        ("snapkv", "window_size", 0),
        ("snapkv", "window_size", -3),
        ("snapkv", "kernel_size", 4),
        ("snapkv", "kernel_size", 0),
        ("snapkv", "pooling", "median"),
        ("streaming", "sink_tokens", -1),
        ("random", "seed", -1),
        ("h2o", "decode_eviction", "perhaps"),
        ("lookm-pivotal", "keep_all_text", "perhaps"),
        ("h2o", "window_size", 2.5),
        ("tova", "head_average", "kv"),
        ("tova", "window_size", -1),
        ("knorm", "window_size", -1),
        ("vl-cache", "threshold", 1.5),
        ("vl-cache", "threshold", -0.1),
        ("vl-cache", "window_ratio", 2.0),
        ("vl-cache", "min_layer_ratio", -0.5),
        ("vl-cache", "allocation", "lazy"),
        ("vl-cache", "fallback_window", 0),
        ("vl-cache", "threshold", math.nan),
    ],
)
def test_bad_strategy_field_names_the_field(name: str, field: str, value: Any) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_name(name, **{field: value})
    assert_names_field(caught.value, field)


def test_even_kernel_message_explains_why() -> None:
    with pytest.raises(pydantic.ValidationError, match="odd"):
        Compressor.from_name("snapkv", kernel_size=4)


@pytest.mark.parametrize("name", BUILTIN_STRATEGIES)
def test_unknown_field_is_rejected_by_name(name: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_name(name, compresion_ratio=0.5)  # sic: a typo must not be ignored
    assert_names_field(caught.value, "compresion_ratio")


def test_fields_of_other_strategies_are_rejected() -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_name("streaming", window_size=8)
    assert_names_field(caught.value, "window_size")


def test_validation_error_is_a_value_error() -> None:
    # the architecture allows "pydantic.ValidationError (or a ValueError subclass)"
    with pytest.raises(ValueError):
        Compressor.from_name("h2o", compression_ratio=1.5)


def test_direct_construction_validates_too() -> None:
    from kvpress_mm.strategies.snapkv import SnapKV

    with pytest.raises(pydantic.ValidationError) as caught:
        SnapKV(pooling="median")
    assert_names_field(caught.value, "pooling")
    with pytest.raises(pydantic.ValidationError) as caught:
        SnapKV.model_validate_json('{"compression_ratio": 1.5}')
    assert_names_field(caught.value, "compression_ratio")


# -- base classes ---------------------------------------------------------------------------------


def test_base_classes_are_abstract() -> None:
    with pytest.raises(TypeError):
        Compressor()  # type: ignore[abstract]
    with pytest.raises(TypeError):
        ScoredCompressor()  # type: ignore[abstract]


def test_a_scored_subclass_is_a_validated_config() -> None:
    class Norm(ScoredCompressor):
        bias: float = pydantic.Field(default=0.0, ge=0.0)

        def score(self, layer: Any) -> torch.Tensor:
            return -layer.keys.float().norm(dim=-1) + self.bias

    norm = Norm(compression_ratio=0.25, bias=1.0)
    assert repr(norm) == "Norm(compression_ratio=0.25, bias=1.0)"
    assert Norm.model_validate_json(norm.model_dump_json()) == norm
    assert norm.name == "Norm"  # not registered: its class name
    with pytest.raises(pydantic.ValidationError) as caught:
        Norm(bias=-1.0)
    assert_names_field(caught.value, "bias")
    with pytest.raises(pydantic.ValidationError) as caught:
        Norm(compression_ratio=1.0)
    assert_names_field(caught.value, "compression_ratio")
