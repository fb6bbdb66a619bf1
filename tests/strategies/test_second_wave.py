"""tova, knorm and vl-cache against naive references of their definitions (docs/strategies/)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvpress_mm import Compressor, DecodeView, LayerView
from kvpress_mm.cache.surgery import apply_plan
from kvpress_mm.errors import InvalidPlanError
from tests.helpers.references import (
    naive_knorm_scores,
    naive_tova_scores,
    naive_vl_cache_statistics,
    naive_water_fill,
    post_vision_start,
)
from tests.helpers.synthetic import (
    SETTINGS,
    CacheLayer,
    SyntheticCase,
    kept_rows,
    make_tensors,
    make_view,
    real_positions,
    synthetic_cases,
)

TOL = 1e-5


def assert_top_outside_window(view: LayerView, plan: Any, scores: list[torch.Tensor], windows: list[int]) -> None:
    """Every row keeps its window plus entries scoring at least as high as every evicted one (per KV head)."""
    for b in range(view.batch_size):
        real = real_positions(view.modality[b])
        kept_heads = kept_rows(plan, b)
        if len(kept_heads[0]) >= len(real):
            continue
        w = windows[b]
        assert all(set(real[len(real) - w :]) <= set(kept) for kept in kept_heads), "the window is kept"
        for h, kept in enumerate(kept_heads):
            outside = [i for i, p in enumerate(real[: len(real) - w])]
            chosen = [i for i in outside if real[i] in set(kept)]
            evicted = [i for i in outside if real[i] not in set(kept)]
            if chosen and evicted:
                assert float(scores[b][h, chosen].min()) >= float(scores[b][h, evicted].max()) - TOL


# -- tova -----------------------------------------------------------------------------------------


@SETTINGS
@given(case=synthetic_cases(), head_average=st.sampled_from(["layer", "group"]), window=st.integers(0, 30))
def test_tova_keeps_the_last_querys_top_entries(case: SyntheticCase, head_average: str, window: int) -> None:
    view = make_view(case)
    tova = Compressor.from_name("tova", compression_ratio=case.ratio, head_average=head_average, window_size=window)
    plan = tova.plan(view)
    assert_top_outside_window(view, plan, naive_tova_scores(view, head_average), [min(window, n) for n in view.n_keep])
    if head_average == "layer":  # one ranking: every KV head keeps the same entries
        for b in range(case.batch):
            heads = kept_rows(plan, b)
            assert all(h == heads[0] for h in heads)


def test_tova_group_average_differs_from_layer_average() -> None:
    """Teeth for the head_average option: per-group rankings keep different entries per KV head."""
    case = SyntheticCase(3, 2, 8, (60,), ((0,) * 60,), 0.7, 5)
    tensors = make_tensors(case)
    plans = {
        mode: Compressor.from_name("tova", compression_ratio=0.7, head_average=mode).plan(
            make_view(case, tensors=tensors)
        )
        for mode in ("layer", "group")
    }
    assert not torch.equal(plans["layer"].kept_indices, plans["group"].kept_indices)
    assert not torch.equal(plans["group"].kept_indices[0, 0], plans["group"].kept_indices[0, 1])


@SETTINGS
@given(
    case=synthetic_cases(ratio=st.floats(0.05, 0.95)),
    head_average=st.sampled_from(["layer", "group"]),
    window=st.integers(0, 3),
    steps=st.integers(1, 4),
)
def test_tova_decode_eviction_re_scores_by_the_newest_query(
    case: SyntheticCase, head_average: str, window: int, steps: int
) -> None:
    view = make_view(case)
    tova = Compressor.from_name(
        "tova", compression_ratio=case.ratio, head_average=head_average, window_size=window, decode_eviction=True
    )
    plan = tova.plan(view)
    cache = CacheLayer(view.keys.clone(), view.values.clone())
    apply_plan(cache, plan)
    slot_valid, n_slots = plan.slot_valid.clone(), plan.n_slots
    groups = case.groups
    gen = torch.Generator().manual_seed(case.seed + 7)
    for _ in range(steps):
        new_k = torch.randn(case.batch, case.kv_heads, 1, case.head_dim, generator=gen)
        new_q = 1.5 * torch.randn(case.batch, case.heads, 1, case.head_dim, generator=gen)
        keys = torch.cat([cache.keys, new_k], dim=2)
        values = torch.cat([cache.values, torch.randn_like(new_k)], dim=2)
        valid = torch.cat([slot_valid, torch.ones(case.batch, 1, dtype=torch.bool)], dim=-1)
        decode_view = DecodeView(
            layer_idx=case.layer_idx,
            keys=keys,
            values=values,
            queries=new_q,
            scaling=case.head_dim**-0.5,
            slot_valid=valid,
            visible=valid[:, None, :],
            n_keep=case.n_keep,
            state=view.state,
        )
        step = tova.decode_plan(decode_view)
        assert step is not None and step.n_slots == n_slots
        assert torch.equal(step.slot_valid, slot_valid)
        for b in range(case.batch):
            idx = valid[b].nonzero().squeeze(-1)
            probs = torch.stack(
                [
                    torch.softmax(
                        (keys[b, h // groups, idx].double() @ new_q[b, h, 0].double()) * case.head_dim**-0.5, -1
                    )
                    for h in range(case.heads)
                ]
            )  # [Hq, valid]
            if head_average == "layer":
                per_kv = probs.mean(0).expand(case.kv_heads, -1)
            else:
                per_kv = probs.view(case.kv_heads, groups, -1).mean(1)
            total = n_slots + 1
            n_fill = total - len(idx)
            w = min(window, min(case.n_keep[b], case.lengths[b]))
            for h in range(case.kv_heads):
                kept = step.kept_indices[b, h].tolist()
                assert kept[:n_fill] == list(range(n_fill)), "filler slots are never evicted"
                (evicted,) = sorted(set(range(total)) - set(kept))
                assert n_fill <= evicted < total - w, "the window is kept (the new entry may go)"
                scores = {int(p): float(per_kv[h, i]) for i, p in enumerate(idx)}
                lowest = min(scores[p] for p in range(n_fill, total - w))
                assert scores[evicted] <= lowest + TOL
        cache = CacheLayer(keys, values)
        apply_plan(cache, step)


def test_tova_without_decode_eviction_compresses_once() -> None:
    case = SyntheticCase(1, 1, 4, (10,), ((0,) * 10,), 0.5, 0)
    view = make_view(case)
    tova = Compressor.from_name("tova", compression_ratio=0.5)
    tova.plan(view)
    assert "tova_windows" not in view.state
    assert not tova.acts_while_decoding or tova.decode_plan(_dummy_decode_view(view)) is None


def _dummy_decode_view(view: LayerView) -> DecodeView:
    valid = torch.ones(view.batch_size, view.seq_len, dtype=torch.bool)
    return DecodeView(
        layer_idx=0,
        keys=view.keys,
        values=view.values,
        queries=view.queries[:, :, -1:],
        scaling=view.scaling,
        slot_valid=valid,
        visible=valid[:, None, :],
        n_keep=view.n_keep,
        state=view.state,
    )


# -- knorm ----------------------------------------------------------------------------------------


@SETTINGS
@given(case=synthetic_cases(), window=st.integers(0, 30), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_knorm_keeps_the_lowest_key_norms(case: SyntheticCase, window: int, dtype: torch.dtype) -> None:
    view = make_view(case, dtype)
    plan = Compressor.from_name("knorm", compression_ratio=case.ratio, window_size=window).plan(view)
    assert_top_outside_window(view, plan, naive_knorm_scores(view), [min(window, n) for n in view.n_keep])


# -- vl-cache -------------------------------------------------------------------------------------

VL_CONFIGS = st.fixed_dictionaries(
    {
        "threshold": st.sampled_from([0.0, 0.01, 0.1, 0.5]),
        "window_ratio": st.sampled_from([0.0, 0.1, 0.3]),
        "min_layer_ratio": st.sampled_from([0.0, 0.01, 0.2]),
        "shared_heads": st.booleans(),
        "fallback_window": st.integers(1, 12),
    }
)


def _layers(case: SyntheticCase, count: int) -> list[LayerView]:
    """``count`` views of different layers (different tensors) sharing the modality map and budgets."""
    views = []
    for layer in range(count):
        layer_case = SyntheticCase(**{**case.__dict__, "seed": case.seed + 101 * layer, "layer_idx": layer})
        view = make_view(layer_case)
        view.num_layers = count
        views.append(view)
    return views


def _bounds(config: dict[str, Any], length: int, n_keep: int) -> tuple[int, int, int, int]:
    """(window, average adaptive part, lo, hi) of a row, from the definition."""
    n = min(n_keep, length)
    window = min(int(config["window_ratio"] * n), n)
    rest = n - window
    return window, rest, min(rest, max(1, int(config["min_layer_ratio"] * length))), length - window


@SETTINGS
@given(case=synthetic_cases(max_length=40), config=VL_CONFIGS, layers=st.integers(1, 4))
def test_vl_cache_deferred_budgets_follow_the_densities(
    case: SyntheticCase, config: dict[str, Any], layers: int
) -> None:
    views = _layers(case, layers)
    strategy = Compressor.from_name("vl-cache", compression_ratio=case.ratio, **config)
    assert strategy.defers_plans
    naive = [
        naive_vl_cache_statistics(v, config["threshold"], config["fallback_window"], config["shared_heads"])
        for v in views
    ]
    for view, (_, densities) in zip(views, naive, strict=True):
        strategy.observe(view)
        computed = view.state["vl_cache"][1]
        assert computed == pytest.approx(densities, abs=1e-5), "density = share of significant pairs"
    observed = [v.state["vl_cache"][1] for v in views]
    plans = strategy.plan_deferred(views)
    for b in range(case.batch):
        length, n_keep = case.lengths[b], case.n_keep[b]
        window, rest, low, high = _bounds(config, length, n_keep)
        parts = naive_water_fill([d[b] for d in observed], layers * rest, low, high)
        counts = [int(p.slot_valid[b].sum()) for p in plans]
        assert counts == [window + part for part in parts]
        assert sum(counts) == layers * min(n_keep, length), "the total is exact"
    for view, plan, (scores, _) in zip(views, plans, naive, strict=True):
        windows = [_bounds(config, case.lengths[b], case.n_keep[b])[0] for b in range(case.batch)]
        assert_top_outside_window(view, plan, scores, windows)
        assert "vl_cache" not in view.state, "the statistics are dropped once planned"


@SETTINGS
@given(case=synthetic_cases(max_length=40), layers=st.integers(1, 4))
def test_vl_cache_equal_densities_give_the_uniform_budget(case: SyntheticCase, layers: int) -> None:
    # threshold 0: every visible pair is significant, every layer's density is 1
    strategy = Compressor.from_name("vl-cache", compression_ratio=case.ratio, threshold=0.0)
    plans = strategy.plan_deferred(_layers(case, layers))
    for plan in plans:
        assert plan.slot_valid.sum(-1).tolist() == [min(n, length) for n, length in zip(case.n_keep, case.lengths)]


@SETTINGS
@given(case=synthetic_cases(max_length=40), config=VL_CONFIGS, layers=st.integers(1, 5))
def test_vl_cache_online_allocation_is_exact_and_causal(
    case: SyntheticCase, config: dict[str, Any], layers: int
) -> None:
    strategy = Compressor.from_name("vl-cache", compression_ratio=case.ratio, allocation="online", **config)
    assert not strategy.defers_plans
    views = _layers(case, layers)
    shared: dict[str, Any] = {}
    densities, counts = [], []
    for view in views:
        view.call_state = shared  # the session shares one dict among the layers of a prefill
        densities.append(naive_vl_cache_statistics(view, config["threshold"], config["fallback_window"], False)[1])
        counts.append(strategy.plan(view).slot_valid.sum(-1).tolist())
    for b in range(case.batch):
        length, n_keep = case.lengths[b], case.n_keep[b]
        window, rest, low, high = _bounds(config, length, n_keep)
        row = [c[b] for c in counts]
        assert sum(row) == layers * min(n_keep, length), "the total is exact"
        assert all(window + low <= c <= window + high for c in row)
        assert row[0] - window == rest, "layer 0 is its own running mean: it gets T / N"


def test_vl_cache_online_needs_num_layers() -> None:
    case = SyntheticCase(1, 1, 4, (10,), ((0,) * 10,), 0.5, 0)
    with pytest.raises(InvalidPlanError, match="num_layers"):
        Compressor.from_name("vl-cache", allocation="online").plan(make_view(case))


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ((0, 0, 1, 1, 1, 0, 0, 0), 5),  # after the image
        ((1, 1, 0, 2, 2, 0), 5),  # after the last video
        ((0, 0, 1, 1), 4 - 3),  # image last: the fallback window (3)
        ((0,) * 6, 6 - 3),  # no image: the fallback window
        ((0, 0), 0),  # shorter than the fallback window
    ],
)
def test_vl_cache_post_vision_queries(row: tuple[int, ...], expected: int) -> None:
    assert post_vision_start(list(row), 3) == expected
    length = len(row)
    case = SyntheticCase(1, 1, 4, (length, length + 3), (row, (0, 0, 0, *row)), 0.5, 0)
    view = make_view(case)
    starts = Compressor.from_name("vl-cache", fallback_window=3).post_vision_starts(view)  # type: ignore[attr-defined]
    pad = case.padded_length - length  # the first row is left-padded
    assert starts == [pad + expected, post_vision_start([0, 0, 0, *row], 3)]


def test_vl_cache_deferred_views_without_queries_refuse_statistics() -> None:
    case = SyntheticCase(1, 1, 4, (10,), ((0,) * 10,), 0.5, 0)
    view = make_view(case)
    view.drop_queries()
    with pytest.raises(InvalidPlanError, match="observe"):
        Compressor.from_name("vl-cache").plan_deferred([view])
