"""``adakv``: configs, refusals, and its kept sets on synthetic layers with every built-in inner strategy.

The expected kept sets come from the naive reference (tests/helpers/adakv_reference.py, written
from the definition), fed with the inner strategy's scores; LOOK-M's merges from the naive merge
of tests/ops/test_merging.py, per head of the ragged plan.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydantic
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from kvpress_mm import Compressor, ScoredCompressor
from kvpress_mm.registry import DISABLE_AUTOLOAD_ENV, reset_registry
from kvpress_mm.wrappers.adakv import AdaKV
from tests.core.test_config import assert_names_field
from tests.helpers.adakv_reference import naive_adakv
from tests.helpers.synthetic import (
    MERGING_STRATEGIES,
    SETTINGS,
    SyntheticCase,
    kept_rows,
    make_tensors,
    make_view,
    real_positions,
    synthetic_cases,
)
from tests.ops.test_merging import MODES, naive_merge
from tests.strategies.test_strategy_properties import expected_window
from tests.wrappers.test_wrapper_properties import SCORED_INNERS, inner_configs, layer_views

TOL = 1e-5


@pytest.fixture(autouse=True)
def builtins_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    reset_registry()
    yield
    reset_registry()


# -- configs ----------------------------------------------------------------------------------------


def test_built_by_name_dict_or_object_and_round_trips() -> None:
    by_name = Compressor.from_name("adakv", inner="snapkv", compression_ratio=0.8)
    by_dict = Compressor.from_name("adakv", inner={"strategy": "snapkv"}, compression_ratio=0.8)
    by_object = Compressor.from_name("adakv", inner=Compressor.from_name("snapkv"), compression_ratio=0.8)
    assert by_name == by_dict == by_object
    assert isinstance(by_name, AdaKV) and by_name.alpha == 0.2
    assert by_name.inner.compression_ratio == 0.8  # the wrapper owns the budget
    config = Compressor.from_name("adakv", inner={"strategy": "knorm", "window_size": 4}, alpha=0.5).to_config()
    assert config == {
        "strategy": "adakv",
        "compression_ratio": 0.5,
        "inner": {"strategy": "knorm", "compression_ratio": 0.5, "window_size": 4},
        "alpha": 0.5,
    }
    assert Compressor.from_config(config).to_config() == config
    assert AdaKV.model_validate(Compressor.from_config(config).model_dump(mode="json")) == Compressor.from_config(
        config
    )


def test_flags_follow_the_inner() -> None:
    assert Compressor.from_name("adakv", compression_ratio=0.0).is_noop
    assert not Compressor.from_name("adakv", compression_ratio=0.5).is_noop
    h2o = {"strategy": "h2o", "decode_eviction": False}
    assert Compressor.from_name("adakv", inner=h2o).needs_accumulated_attention
    assert not Compressor.from_name("adakv", inner="snapkv").needs_accumulated_attention
    assert not Compressor.from_name("adakv", inner=h2o).acts_while_decoding
    assert not Compressor.from_name("adakv").allocates_budgets  # pyramid(adakv(...)) is Ada-Pyramid


BAD: list[tuple[dict[str, Any], str]] = [
    ({"inner": "h2o"}, "use decode_eviction=False"),  # h2o evicts while decoding by default
    ({"inner": {"strategy": "tova", "decode_eviction": True}}, "use decode_eviction=False"),
    ({"inner": "full"}, "adakv needs an inner strategy that scores entries (a ScoredCompressor); 'full' is not one"),
    ({"inner": {"strategy": "pyramid"}}, "write pyramid(adakv(...)) instead"),
    ({"inner": {"strategy": "mixkv"}}, "write mixkv(adakv(...)) instead"),
    ({"inner": {"strategy": "modality-budget"}}, "modality-budget and adakv do not compose either way"),
    ({"inner": {"strategy": "adakv"}}, "adakv(adakv(...)) is meaningless"),
    ({"inner": "vl-cache"}, "two owners for one budget"),
    ({"inner": {"strategy": "lookm-average", "keep_all_text": True}}, "keep_all_text"),
    ({"inner": {"strategy": "snapkv", "compression_ratio": 0.3}, "compression_ratio": 0.8}, "Set compression_ratio on"),
    ({"inner": "snapvk"}, "Did you mean 'snapkv'"),
]


@pytest.mark.parametrize(("config", "message"), BAD)
def test_bad_combinations_are_refused_at_construction(config: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_name("adakv", **config)
    assert_names_field(caught.value, "inner")
    assert message in str(caught.value), str(caught.value)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "a lot"])
def test_bad_alpha_names_the_field(alpha: Any) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_name("adakv", alpha=alpha)
    assert_names_field(caught.value, "alpha")


def test_compositions_that_make_sense_build() -> None:
    ada_pyramid = Compressor.from_name("pyramid", inner={"strategy": "adakv", "inner": "snapkv"}, compression_ratio=0.7)
    assert ada_pyramid.inner.compression_ratio == 0.7  # type: ignore[attr-defined]
    mixed = Compressor.from_name("mixkv", inner={"strategy": "adakv", "inner": "knorm"})
    assert isinstance(mixed.inner, AdaKV)  # type: ignore[attr-defined]


# -- kept sets ----------------------------------------------------------------------------------------

ADAKV_INNERS = SCORED_INNERS  # every built-in scored strategy but vl-cache (refused: it owns its budgets)


def _inner(name: str, config: dict[str, Any]) -> dict[str, Any]:
    if "decode_eviction" in config:
        config = {**config, "decode_eviction": False}  # refused otherwise (tested above)
    return {"strategy": name, **config}


@SETTINGS
@given(
    case=synthetic_cases(max_length=40),
    inner=inner_configs(ADAKV_INNERS),
    alpha=st.sampled_from([0.0, 0.2, 0.5, 1.0]) | st.floats(0.0, 1.0),
)
def test_adakv_keeps_the_naive_reference_sets_with_every_inner(
    case: SyntheticCase, inner: tuple[str, dict[str, Any]], alpha: float
) -> None:
    name, config = inner
    inner_config = _inner(name, config)
    wrapper = Compressor.from_name("adakv", compression_ratio=case.ratio, inner=inner_config, alpha=alpha)
    scorer = wrapper.inner  # type: ignore[attr-defined]
    assert isinstance(scorer, ScoredCompressor)
    tensors = make_tensors(case)
    view = make_view(case, tensors=tensors)
    plan = wrapper.plan(view)
    scores = scorer.score(make_view(case, tensors=tensors)).float()
    for b in range(case.batch):
        real = real_positions(view.modality[b])
        length, n_keep = len(real), case.n_keep[b]
        window = expected_window(name, config, n_keep)
        floor = int(alpha * n_keep)
        expected = naive_adakv(scores[b][:, real].tolist(), n_keep, window, floor)
        got = kept_rows(plan, b)
        assert got == [[real[j] for j in head] for head in expected]
        counts = [len(head) for head in got]
        if n_keep < length:
            assert sum(counts) == case.kv_heads * n_keep, "the total is exact"
            assert all(max(floor, window) <= c <= length for c in counts), "floors and caps"
            assert all(set(real[length - window :]) <= set(head) for head in got), "every head keeps the window"
        else:
            assert counts == [length] * case.kv_heads
    assert (plan.keys is not None) == (name in MERGING_STRATEGIES), "the inner strategy's finish (merges) applies"


@SETTINGS
@given(
    case=synthetic_cases(max_length=40, ratio=st.sampled_from([0.5, 0.8, 0.9])),
    name=st.sampled_from(MERGING_STRATEGIES),
)
def test_lookm_merges_each_head_into_its_own_kept_entries(case: SyntheticCase, name: str) -> None:
    wrapper = Compressor.from_name("adakv", compression_ratio=case.ratio, inner=name, alpha=0.0)
    view = make_view(case)
    plan = wrapper.plan(view)
    assert plan.keys is not None and plan.values is not None
    changed, ambiguous = naive_merge(view, plan, MODES[name])
    assume(not ambiguous)
    valid = plan.valid_per_head()
    for b in range(case.batch):
        for h in range(case.kv_heads):
            for slot in range(plan.n_slots):
                if not valid[b, h, slot]:
                    continue
                position = int(plan.kept_indices[b, h, slot])
                if slot not in changed[b][h]:
                    assert torch.equal(plan.keys[b, h, slot], view.keys[b, h, position])
                    continue
                key, value = changed[b][h][slot]
                torch.testing.assert_close(
                    plan.keys[b, h, slot].double(), torch.tensor(key).double(), atol=TOL, rtol=TOL
                )
                torch.testing.assert_close(
                    plan.values[b, h, slot].double(), torch.tensor(value).double(), atol=TOL, rtol=TOL
                )


@SETTINGS
@given(case=synthetic_cases(max_length=40), inner=inner_configs(ADAKV_INNERS))
def test_alpha_one_is_the_inner_strategy_per_head(case: SyntheticCase, inner: tuple[str, dict[str, Any]]) -> None:
    """Every head's floor is its whole budget: a rectangular plan, the inner strategy's own counts."""
    name, config = inner
    inner_config = _inner(name, config)
    wrapper = Compressor.from_name("adakv", compression_ratio=case.ratio, inner=inner_config, alpha=1.0)
    plain = Compressor.from_config({**inner_config, "compression_ratio": case.ratio})
    tensors = make_tensors(case)
    got, expected = wrapper.plan(make_view(case, tensors=tensors)), plain.plan(make_view(case, tensors=tensors))
    assert got.head_valid is None
    assert torch.equal(got.slot_valid, expected.slot_valid)


@SETTINGS
@given(case=synthetic_cases(ratio=st.just(0.0)), inner=inner_configs(ADAKV_INNERS))
def test_ratio_zero_keeps_everything(case: SyntheticCase, inner: tuple[str, dict[str, Any]]) -> None:
    name, config = inner
    wrapper = Compressor.from_name("adakv", compression_ratio=0.0, inner=_inner(name, config))
    assert wrapper.is_noop
    plan = wrapper.plan(make_view(case))
    assert plan.head_valid is None
    for b in range(case.batch):
        assert kept_rows(plan, b) == [real_positions(make_view(case).modality[b])] * case.kv_heads


@SETTINGS
@given(case=synthetic_cases(max_length=50), layers=st.integers(2, 4))
def test_ada_pyramid_shares_each_layer_budget_across_heads(case: SyntheticCase, layers: int) -> None:
    ada = Compressor.from_name("pyramid", compression_ratio=case.ratio, inner={"strategy": "adakv", "inner": "knorm"})
    pyramid = Compressor.from_name("pyramid", compression_ratio=case.ratio, inner="knorm")
    for first, second in zip(layer_views(case, layers), layer_views(case, layers), strict=True):
        got, uniform = ada.plan(first), pyramid.plan(second)
        for b in range(case.batch):
            # the layer's total is the pyramid's budget for the layer, shared across heads
            assert sum(len(head) for head in kept_rows(got, b)) == sum(len(head) for head in kept_rows(uniform, b))


@SETTINGS
@given(case=synthetic_cases(max_length=50))
def test_mixkv_over_adakv_keeps_the_adakv_counts(case: SyntheticCase) -> None:
    """Allocation by the inner scores (AdaKV's), selection by MixKV's mixed score."""
    ada = Compressor.from_name("adakv", compression_ratio=case.ratio, inner="knorm")
    mixed = Compressor.from_name("mixkv", compression_ratio=case.ratio, inner={"strategy": "adakv", "inner": "knorm"})
    tensors = make_tensors(case)
    got, expected = mixed.plan(make_view(case, tensors=tensors)), ada.plan(make_view(case, tensors=tensors))
    for b in range(case.batch):
        assert [len(h) for h in kept_rows(got, b)] == [len(h) for h in kept_rows(expected, b)]


def test_heads_with_spread_out_scores_get_more() -> None:
    """A hand-made layer: head 0's scores are flat (it needs many entries), head 1's are peaked."""
    case = SyntheticCase(2, 1, 4, (20,), ((0,) * 20,), 0.5, 0)
    view = make_view(case)

    class Fixed(ScoredCompressor):
        def score(self, layer: Any) -> torch.Tensor:
            flat = torch.full((20,), 0.05)
            peaked = torch.tensor([0.9] + [0.005] * 19)
            return torch.stack([flat, peaked])[None]

    plan = AdaKV(inner=Fixed(), compression_ratio=0.5, alpha=0.2).plan(view)
    assert [len(head) for head in kept_rows(plan, 0)] == [18, 2]  # floors: int(0.2 * 10) = 2 each
    assert plan.head_valid is not None
