"""Wrapper configs: built from names, dicts or objects, round-tripping, owning the budget, refusing bad combinations."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest
import torch

from kvpress_mm import CompressionPlan, Compressor, LayerView
from kvpress_mm.errors import UnknownStrategyError
from kvpress_mm.registry import DISABLE_AUTOLOAD_ENV, reset_registry
from kvpress_mm.wrappers import BUILTIN_WRAPPERS
from kvpress_mm.wrappers.base import Wrapper
from tests.core.test_config import assert_names_field


@pytest.fixture(autouse=True)
def builtins_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    reset_registry()
    yield
    reset_registry()


# chains that must build and round-trip (every built-in wrapper, nested where meaningful)
CHAINS: list[dict[str, Any]] = [
    {"strategy": "pyramid"},
    {"strategy": "pyramid", "inner": "h2o", "compression_ratio": 0.8, "beta": 5.0, "cap": "spill"},
    {"strategy": "pyramid", "inner": {"strategy": "snapkv", "window_size": 8}, "window_outside": False},
    {"strategy": "pyramid", "inner": {"strategy": "mixkv", "inner": "lookm-pivotal"}},
    {"strategy": "modality-budget", "inner": "knorm", "vision_ratio": 0.9, "text_ratio": 0.2},
    {"strategy": "modality-budget", "inner": "tova", "compression_ratio": 0.7, "vision_ratio": 0.95},
    {"strategy": "mixkv"},
    {"strategy": "mixkv", "inner": {"strategy": "pyramid", "inner": "snapkv"}, "compression_ratio": 0.9},
    {"strategy": "mixkv", "inner": {"strategy": "modality-budget", "inner": "h2o", "text_ratio": 0.5}},
    {"strategy": "mixkv", "inner": {"strategy": "vl-cache", "allocation": "online"}},
]


def test_builtin_wrappers_are_wrappers_with_a_default_inner() -> None:
    for name in BUILTIN_WRAPPERS:
        wrapper = Compressor.from_name(name)
        assert isinstance(wrapper, Wrapper)
        assert wrapper.name == name
        assert wrapper.inner == Compressor.from_name("snapkv")  # the default inner, at the same ratio


@pytest.mark.parametrize("config", CHAINS, ids=lambda c: json.dumps(c, sort_keys=True))
def test_round_trips(config: dict[str, Any]) -> None:
    wrapper = Compressor.from_config(config)
    saved = wrapper.to_config()
    assert saved["strategy"] == config["strategy"]
    assert isinstance(saved["inner"], dict) and "strategy" in saved["inner"], "the inner serialises as its to_config()"
    assert Compressor.from_config(json.loads(json.dumps(saved))) == wrapper
    cls = type(wrapper)
    assert cls.model_validate_json(wrapper.model_dump_json()) == wrapper
    assert cls.model_validate(wrapper.model_dump(mode="json")) == wrapper
    assert "inner=" in repr(wrapper) and type(wrapper.inner).__name__ in repr(wrapper)


def test_inner_from_name_dict_or_object_is_the_same() -> None:
    by_name = Compressor.from_name("pyramid", inner="h2o", compression_ratio=0.8)
    by_dict = Compressor.from_name("pyramid", inner={"strategy": "h2o"}, compression_ratio=0.8)
    by_object = Compressor.from_name("pyramid", inner=Compressor.from_name("h2o"), compression_ratio=0.8)
    assert by_name == by_dict == by_object
    # the wrapper owns the budget: its ratio reaches every inner level
    nested = Compressor.from_name("mixkv", inner={"strategy": "pyramid", "inner": "h2o"}, compression_ratio=0.7)
    assert nested.inner.compression_ratio == nested.inner.inner.compression_ratio == 0.7  # type: ignore[attr-defined]


def test_an_inner_ratio_must_match_the_wrapper() -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_name("pyramid", compression_ratio=0.8, inner={"strategy": "snapkv", "compression_ratio": 0.5})
    assert_names_field(caught.value, "inner")
    assert "Set compression_ratio on 'pyramid'" in str(caught.value)
    with pytest.raises(pydantic.ValidationError, match="owns the budget"):
        Compressor.from_name("mixkv", inner=Compressor.from_name("pyramid", compression_ratio=0.3))  # default 0.5
    # equal is fine, also deep in a chain
    inner = Compressor.from_name(
        "pyramid", inner=Compressor.from_name("h2o", compression_ratio=0.6), compression_ratio=0.6
    )
    assert Compressor.from_name("mixkv", inner=inner, compression_ratio=0.6).compression_ratio == 0.6
    with pytest.raises(pydantic.ValidationError, match="'pyramid' sets compression_ratio=0.6"):
        Compressor.from_name("mixkv", inner=inner, compression_ratio=0.9)


def test_unknown_inner_names_the_available_strategies() -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_name("pyramid", inner="snapvk")
    assert_names_field(caught.value, "inner")
    assert "Did you mean 'snapkv'" in str(caught.value) and "Available strategies" in str(caught.value)
    with pytest.raises(pydantic.ValidationError, match="inner"):
        Compressor.from_name("mixkv", inner=42)
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_name("pyramid", inner={"strategy": "snapkv", "window_size": 0})
    assert "inner.window_size" in str(caught.value) or "window_size" in str(caught.value)
    with pytest.raises(UnknownStrategyError):
        Compressor.from_name("pyramidkv")


class _Unscored(Compressor):
    """A plugin-like strategy with its own plan and no scores."""

    def plan(self, layer: LayerView) -> CompressionPlan:
        raise NotImplementedError


BAD_COMBINATIONS: list[tuple[str, dict[str, Any], str]] = [
    ("pyramid", {"inner": {"strategy": "pyramid"}}, "pyramid(pyramid(...)) is meaningless"),
    ("pyramid", {"inner": "vl-cache"}, "two owners for one budget"),
    ("pyramid", {"inner": {"strategy": "modality-budget"}}, "two owners for one budget"),
    ("pyramid", {"inner": {"strategy": "mixkv", "inner": "vl-cache"}}, "two owners for one budget"),
    ("modality-budget", {"inner": {"strategy": "modality-budget"}}, "modality-budget(modality-budget(...)) is mean"),
    ("modality-budget", {"inner": {"strategy": "pyramid"}}, "two owners for one budget"),
    ("modality-budget", {"inner": "vl-cache"}, "two owners for one budget"),
    ("modality-budget", {"inner": "full"}, "needs an inner strategy that scores entries"),
    ("modality-budget", {"inner": {"strategy": "mixkv"}}, "write mixkv(modality-budget(...)) instead"),
    ("mixkv", {"inner": {"strategy": "mixkv"}}, "mixkv(mixkv(...)) is meaningless"),
    ("mixkv", {"inner": "full"}, "needs an inner strategy that scores entries"),
    ("mixkv", {"inner": {"strategy": "pyramid", "inner": "full"}}, "'full' is not one"),
    *[
        (wrapper, {"inner": {"strategy": "lookm-pivotal", "keep_all_text": True}}, "keep_all_text")
        for wrapper in BUILTIN_WRAPPERS
    ],
]


@pytest.mark.parametrize(("name", "config", "message"), BAD_COMBINATIONS)
def test_bad_combinations_are_refused_at_construction(name: str, config: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_name(name, **config)
    assert_names_field(caught.value, "inner")
    assert message in str(caught.value), str(caught.value)


def test_an_inner_without_scores_is_refused_by_mixkv_and_modality_budget() -> None:
    for name in ("mixkv", "modality-budget"):
        with pytest.raises(pydantic.ValidationError, match="'_Unscored' is not one"):
            Compressor.from_name(name, inner=_Unscored())
    # pyramid only sets budgets: any strategy that keeps the budget it is given will do
    assert Compressor.from_name("pyramid", inner=_Unscored()).inner == _Unscored()


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        ("pyramid", "beta", 0.5),
        ("pyramid", "beta", float("inf")),
        ("pyramid", "cap", "clip"),
        ("pyramid", "window_outside", "perhaps"),
        ("modality-budget", "vision_ratio", 1.0),
        ("modality-budget", "text_ratio", -0.1),
        ("modality-budget", "text_ratio", float("nan")),
        ("mixkv", "compression_ratio", 1.0),
        ("mixkv", "weight", "online"),  # no such option
    ],
)
def test_bad_wrapper_fields_name_the_field(name: str, field: str, value: Any) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_name(name, **{field: value})
    assert_names_field(caught.value, field)


def test_modality_budget_ratios() -> None:
    both = Compressor.from_name("modality-budget", vision_ratio=0.9, text_ratio=0.3)
    assert both.ratios == (0.9, 0.3)  # type: ignore[attr-defined]
    assert "compression_ratio" not in both.to_config(), "unused when both modality ratios are set"
    one = Compressor.from_name("modality-budget", vision_ratio=0.9, compression_ratio=0.4)
    assert one.ratios == (0.9, 0.4)  # type: ignore[attr-defined]
    with pytest.raises(pydantic.ValidationError, match="compression_ratio is unused"):
        Compressor.from_name("modality-budget", vision_ratio=0.9, text_ratio=0.3, compression_ratio=0.5)
    modality = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert both.budgets(modality) == (int(8 * (1 - 0.9)) + int(4 * 0.7), int(10 * 0.7))
    # a row whose ratios keep nothing keeps one entry: text if it has any
    tiny = Compressor.from_name("modality-budget", vision_ratio=0.9, text_ratio=0.9)
    assert tiny.budgets(torch.tensor([[0, 1, 1]])) == (1,)
    assert tiny.modality_budgets(torch.tensor([0, 1, 1])) == (0, 1)  # type: ignore[attr-defined]
    assert tiny.modality_budgets(torch.tensor([1, 1, 1])) == (1, 0)  # type: ignore[attr-defined]


def test_no_op_and_flags_follow_the_inner() -> None:
    def build(name: str, **config: Any) -> Compressor:
        return Compressor.from_name(name, **config)

    assert build("pyramid", compression_ratio=0.0).is_noop
    assert build("pyramid", inner="full", compression_ratio=0.8).is_noop
    assert not build("pyramid", compression_ratio=0.8).is_noop
    assert build("mixkv", compression_ratio=0.0).is_noop
    assert build("modality-budget", vision_ratio=0.0, text_ratio=0.0).is_noop
    assert build("modality-budget", compression_ratio=0.0).is_noop
    assert not build("modality-budget", compression_ratio=0.0, vision_ratio=0.5).is_noop
    assert build("pyramid", inner="h2o").needs_accumulated_attention
    assert build("mixkv", inner={"strategy": "pyramid", "inner": "lookm-pivotal"}).needs_accumulated_attention
    assert not build("pyramid", inner="snapkv").needs_accumulated_attention
    assert build("pyramid", inner="h2o").acts_while_decoding
    assert not build("pyramid", inner={"strategy": "h2o", "decode_eviction": False}).acts_while_decoding
    assert build("modality-budget", inner={"strategy": "tova", "decode_eviction": True}).acts_while_decoding
    assert build("mixkv", inner="vl-cache").defers_plans
    assert not build("mixkv", inner={"strategy": "vl-cache", "allocation": "online"}).defers_plans
    assert build("mixkv", inner="vl-cache").allocates_budgets and not build("mixkv").allocates_budgets
    assert build("pyramid").allocates_budgets and build("modality-budget").allocates_budgets


def test_wrappers_are_frozen() -> None:
    wrapper = Compressor.from_name("pyramid")
    with pytest.raises(pydantic.ValidationError):
        wrapper.beta = 3.0  # type: ignore[misc,attr-defined]
    with pytest.raises(pydantic.ValidationError):
        wrapper.inner = Compressor.from_name("h2o")  # type: ignore[misc,attr-defined]
