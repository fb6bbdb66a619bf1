"""Property tests of the wrappers on synthetic layers: exact totals, floors, windows, ratio 0, every built-in inner.

The expected budgets come from the naive references (tests/helpers/references.py) and the
definitions in the wrappers' docstrings, not from the wrappers' own code.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvpress_mm import CompressionPlan, Compressor, LayerView, Modality, ScoredCompressor
from kvpress_mm.errors import InvalidPlanError
from kvpress_mm.strategies import BUILTIN_STRATEGIES
from tests.helpers.references import naive_knorm_scores, naive_mixkv_scores, naive_pyramid, naive_tova_scores
from tests.helpers.synthetic import (
    SETTINGS,
    SyntheticCase,
    kept_rows,
    make_tensors,
    make_view,
    ratios,
    real_positions,
    synthetic_cases,
)
from tests.strategies.test_strategy_properties import configs, expected_window

TOL = 1e-5
PYRAMID_INNERS = tuple(name for name in BUILTIN_STRATEGIES if name != "vl-cache")
SCORED_INNERS = tuple(name for name in BUILTIN_STRATEGIES if name not in ("full", "vl-cache"))
MIXKV_INNERS = tuple(name for name in BUILTIN_STRATEGIES if name != "full")


@st.composite
def inner_configs(draw: st.DrawFn, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """A built-in inner strategy and a random valid config (LOOK-M without keep_all_text: wrappers refuse it)."""
    name = draw(st.sampled_from(names))
    config = draw(configs(name))
    if "keep_all_text" in config:
        config["keep_all_text"] = False
    return name, config


def layer_views(case: SyntheticCase, layers: int) -> list[LayerView]:
    """Views of layers ``0 .. layers-1`` (the same tensors), with ``num_layers``."""
    tensors = make_tensors(case)
    views = []
    for layer in range(layers):
        view = make_view(case, tensors=tensors)
        view.layer_idx, view.num_layers = layer, layers
        views.append(view)
    return views


def counts(plan: CompressionPlan) -> list[int]:
    return [int(n) for n in plan.slot_valid.sum(-1).tolist()]


def assert_window_kept(plan: CompressionPlan, view: LayerView, windows: list[int]) -> None:
    for b in range(view.batch_size):
        real = real_positions(view.modality[b])
        recent = set(real[len(real) - windows[b] :]) if windows[b] else set()
        for kept in kept_rows(plan, b):
            assert len(kept) == len(set(kept)) and all(x < y for x, y in zip(kept, kept[1:]))
            assert set(kept) <= set(real), "padding is never kept"
            assert recent <= set(kept), "the inner strategy's window is kept"


def assert_top(scores: torch.Tensor, kept: set[int], candidates: list[int], real: list[int], what: str) -> None:
    """Among ``candidates`` (indices into ``real``), every kept one scores at least as high as every evicted one."""
    chosen = [i for i in candidates if real[i] in kept]
    evicted = [i for i in candidates if real[i] not in kept]
    if chosen and evicted:
        assert float(scores[chosen].min()) >= float(scores[evicted].max()) - TOL, what


# -- pyramid --------------------------------------------------------------------------------------


@SETTINGS
@given(
    case=synthetic_cases(max_length=60),
    inner=inner_configs(PYRAMID_INNERS),
    layers=st.integers(1, 6),
    beta=st.sampled_from([1.0, 2.0, 20.0]),
    window_outside=st.booleans(),
    cap=st.sampled_from(["line", "spill"]),
)
def test_pyramid_gives_each_layer_its_share_of_an_exact_total(
    case: SyntheticCase, inner: tuple[str, dict[str, Any]], layers: int, beta: float, window_outside: bool, cap: str
) -> None:
    name, config = inner
    pyramid = Compressor.from_name(
        "pyramid",
        compression_ratio=case.ratio,
        inner={"strategy": name, **config},
        beta=beta,
        window_outside=window_outside,
        cap=cap,
    )
    views = layer_views(case, layers)
    plans = [pyramid.plan(view) for view in views]
    for b in range(case.batch):
        length, n_keep = case.lengths[b], case.n_keep[b]
        got = [counts(plan)[b] for plan in plans]
        if name == "full":
            assert got == [length] * layers
            continue
        uniform = min(n_keep, length)
        # every layer keeps the inner window (window_outside) and at least one entry before the split
        reserved = max(expected_window(name, config, uniform) if window_outside else 0, 1)
        expected = [reserved + part for part in naive_pyramid(uniform - reserved, layers, length - reserved, beta, cap)]
        assert got == expected
        assert sum(got) == layers * uniform, "the total is exact"
        assert all(reserved <= g <= length for g in got), "floors: the window and one entry; caps: the prompt"
        if cap == "line":
            assert got == sorted(got, reverse=True), "budgets never increase with depth"
    for view, plan in zip(views, plans, strict=True):
        per_row = counts(plan)
        windows = [
            expected_window(name, config, per_row[b]) if per_row[b] < case.lengths[b] else 0 for b in range(case.batch)
        ]
        assert_window_kept(plan, view, windows)


@SETTINGS
@given(case=synthetic_cases(max_length=60), layers=st.integers(2, 5), name=st.sampled_from(["knorm", "tova"]))
def test_pyramid_inner_selects_its_top_entries_within_each_layer_budget(
    case: SyntheticCase, layers: int, name: str
) -> None:
    pyramid = Compressor.from_name("pyramid", compression_ratio=case.ratio, inner=name)
    for view in layer_views(case, layers):
        plan = pyramid.plan(view)
        scores = naive_knorm_scores(view) if name == "knorm" else naive_tova_scores(view, "layer")
        for b in range(case.batch):
            real = real_positions(view.modality[b])
            for h, kept in enumerate(kept_rows(plan, b)):
                assert_top(scores[b][h], set(kept), list(range(len(real))), real, f"pyramid({name})")


# -- modality-budget ------------------------------------------------------------------------------


def expected_modality_budgets(row: list[int], vision_ratio: float, text_ratio: float) -> tuple[int, int]:
    vision = sum(1 for c in row if c in (Modality.IMAGE, Modality.VIDEO))
    text = sum(1 for c in row if c == Modality.TEXT)
    n_vision, n_text = int(vision * (1 - vision_ratio)), int(text * (1 - text_ratio))
    if n_vision + n_text == 0:
        return (0, 1) if text else (1, 0)
    return n_vision, n_text


@SETTINGS
@given(
    case=synthetic_cases(max_length=60),
    inner=inner_configs(SCORED_INNERS),
    vision_ratio=st.one_of(st.none(), ratios),
    text_ratio=st.one_of(st.none(), ratios),
)
def test_modality_budget_keeps_exact_per_modality_counts(
    case: SyntheticCase, inner: tuple[str, dict[str, Any]], vision_ratio: float | None, text_ratio: float | None
) -> None:
    name, config = inner
    both = vision_ratio is not None and text_ratio is not None
    wrapper = Compressor.from_name(
        "modality-budget",
        inner={"strategy": name, **config},
        vision_ratio=vision_ratio,
        text_ratio=text_ratio,
        **({} if both else {"compression_ratio": case.ratio}),
    )
    effective = (
        case.ratio if vision_ratio is None else vision_ratio,
        case.ratio if text_ratio is None else text_ratio,
    )
    view = make_view(case)
    plan = wrapper.plan(view)
    scores = naive_knorm_scores(view) if name == "knorm" else None
    for b in range(case.batch):
        real = real_positions(view.modality[b])
        row = [int(view.modality[b, p]) for p in real]
        n_vision, n_text = expected_modality_budgets(row, *effective)
        assert wrapper.budgets(view.modality[b : b + 1]) == (n_vision + n_text,)
        window = expected_window(name, config, n_vision + n_text)
        in_window = set(range(len(real) - window, len(real)))
        for h, kept in enumerate(kept_rows(plan, b)):
            kept_set = set(kept)
            kept_modalities = [row[real.index(p)] for p in kept]
            assert sum(m == Modality.TEXT for m in kept_modalities) == n_text, "exact text count"
            assert sum(m != Modality.TEXT for m in kept_modalities) == n_vision, "exact vision count"
            for budget, is_mod in ((n_text, lambda c: c == Modality.TEXT), (n_vision, lambda c: c != Modality.TEXT)):
                own = [i for i, c in enumerate(row) if is_mod(c)]
                window_own = [i for i in own if i in in_window]
                protected = window_own[max(0, len(window_own) - budget) :]
                assert {real[i] for i in protected} <= kept_set, "the window counts against its own modality"
                if scores is not None:
                    outside = [i for i in own if i not in in_window]
                    assert_top(scores[b][h], kept_set, outside, real, "modality-budget(knorm)")


# -- mixkv ----------------------------------------------------------------------------------------


@SETTINGS
@given(case=synthetic_cases(max_length=50), inner=inner_configs(MIXKV_INNERS), wrap=st.sampled_from(["", "pyramid"]))
def test_mixkv_keeps_the_inner_budgets_and_windows(
    case: SyntheticCase, inner: tuple[str, dict[str, Any]], wrap: str
) -> None:
    name, config = inner
    if wrap and name == "vl-cache":
        return  # pyramid refuses vl-cache (tested in test_wrapper_config)
    inner_config: dict[str, Any] = {"strategy": name, **config}
    if wrap:
        inner_config = {"strategy": wrap, "inner": inner_config}
    plain = Compressor.from_config({**inner_config, "compression_ratio": case.ratio})
    mixed = Compressor.from_name("mixkv", compression_ratio=case.ratio, inner=inner_config)
    for view_plain, view_mixed in zip(layer_views(case, 3), layer_views(case, 3), strict=True):
        expected, got = plain.plan(view_plain), mixed.plan(view_mixed)
        assert counts(got) == counts(expected), "mixkv changes rankings, never budgets"
        assert (got.keys is None) == (expected.keys is None), "the inner strategy's finish (merges) still applies"
        for b in range(case.batch):
            n = counts(got)[b]
            window = expected_window(name, config, n) if n < case.lengths[b] else 0
            assert_window_kept(got, view_mixed, [window if b2 == b else 0 for b2 in range(case.batch)])


@SETTINGS
@given(case=synthetic_cases(max_length=40), name=st.sampled_from(["knorm", "tova"]), window=st.integers(0, 8))
def test_mixkv_ranks_by_the_mixed_score(case: SyntheticCase, name: str, window: int) -> None:
    view = make_view(case)
    mixed = Compressor.from_name("mixkv", compression_ratio=case.ratio, inner={"strategy": name, "window_size": window})
    plan = mixed.plan(view)
    importance = naive_knorm_scores(view) if name == "knorm" else naive_tova_scores(view, "layer")
    for b in range(case.batch):
        real = real_positions(view.modality[b])
        w = min(window, case.n_keep[b])
        if case.n_keep[b] >= len(real) or len(real) - w == 0:
            continue
        scores = naive_mixkv_scores(view, b, importance[b][:, : len(real) - w], w)
        for h, kept in enumerate(kept_rows(plan, b)):
            assert set(real[len(real) - w :]) <= set(kept)
            assert_top(scores[h], set(kept), list(range(len(real) - w)), real, f"mixkv({name})")


@SETTINGS
@given(case=synthetic_cases(max_length=50), inner=st.sampled_from(["snapkv", "h2o", "lookm-pivotal", "knorm"]))
def test_mixkv_and_pyramid_commute(case: SyntheticCase, inner: str) -> None:
    outer = Compressor.from_name("mixkv", compression_ratio=case.ratio, inner={"strategy": "pyramid", "inner": inner})
    swapped = Compressor.from_name("pyramid", compression_ratio=case.ratio, inner={"strategy": "mixkv", "inner": inner})
    for first, second in zip(layer_views(case, 3), layer_views(case, 3), strict=True):
        a, b = outer.plan(first), swapped.plan(second)
        assert torch.equal(a.kept_indices, b.kept_indices) and torch.equal(a.slot_valid, b.slot_valid)


def test_mixkv_refuses_an_inner_that_bypasses_the_selection() -> None:
    class OwnSelection(ScoredCompressor):
        def score(self, layer: LayerView) -> torch.Tensor:
            return -layer.keys.float().norm(dim=-1)

        def plan(self, layer: LayerView) -> CompressionPlan:  # chooses without select_top_with_window
            kept = torch.arange(layer.seq_len).expand(layer.batch_size, layer.kv_heads, -1)
            return CompressionPlan(kept, layer.key_valid)

    case = SyntheticCase(1, 1, 4, (10,), ((0,) * 10,), 0.5, 0)
    with pytest.raises(InvalidPlanError, match="mixed scores were not used"):
        Compressor.from_name("mixkv", inner=OwnSelection()).plan(make_view(case))


# -- every wrapper: ratio 0 is a no-op -------------------------------------------------------------

NOOP_WRAPPERS: list[dict[str, Any]] = [
    {"strategy": "pyramid", "compression_ratio": 0.0},
    {"strategy": "mixkv", "compression_ratio": 0.0},
    {"strategy": "modality-budget", "compression_ratio": 0.0},
    {"strategy": "modality-budget", "vision_ratio": 0.0, "text_ratio": 0.0},
]


@SETTINGS
@given(
    case=synthetic_cases(ratio=st.just(0.0)),
    wrapper=st.sampled_from(NOOP_WRAPPERS),
    inner=inner_configs(SCORED_INNERS),
)
def test_ratio_zero_keeps_everything(
    case: SyntheticCase, wrapper: dict[str, Any], inner: tuple[str, dict[str, Any]]
) -> None:
    name, config = inner
    strategy = Compressor.from_config({**wrapper, "inner": {"strategy": name, **config}})
    assert strategy.is_noop
    for view in layer_views(case, 3):
        plan = strategy.plan(view)
        for b in range(case.batch):
            assert kept_rows(plan, b) == [real_positions(view.modality[b])] * case.kv_heads
        if plan.keys is not None:  # nothing evicted: nothing merged
            assert torch.equal(
                plan.keys, view.keys.gather(2, plan.kept_indices[..., None].expand(-1, -1, -1, case.head_dim))
            )
