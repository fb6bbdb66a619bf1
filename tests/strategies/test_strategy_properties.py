"""Property tests of the built-in strategies' plans on synthetic layers (see STRATEGIES.md)."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_mm import CompressionPlan, Compressor, LayerView, Modality
from kvpress_mm.cache.surgery import apply_plan
from kvpress_mm.ops.budget import n_keep_for
from kvpress_mm.strategies import BUILTIN_STRATEGIES
from tests.helpers.synthetic import (
    DTYPES,
    LOOKM_STRATEGIES,
    SETTINGS,
    CacheLayer,
    SyntheticCase,
    kept_rows,
    make_tensors,
    make_view,
    naive_h2o_scores,
    naive_snapkv_scores,
    ratios,
    real_positions,
    synthetic_cases,
)

WINDOWS = st.one_of(st.none(), st.integers(0, 100))
TOL = 1e-4  # score comparisons against the float64 references (scores are sums of up to 80 probabilities)


@st.composite
def configs(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """A random valid config (besides ``compression_ratio``) for the strategy ``name``."""
    if name == "random":
        return {"seed": draw(st.integers(0, 10_000))}
    if name == "streaming":
        return draw(st.one_of(st.just({}), st.builds(lambda s: {"sink_tokens": s}, st.integers(0, 12))))
    if name == "h2o":
        return {"window_size": draw(WINDOWS), "decode_eviction": draw(st.booleans())}
    if name in LOOKM_STRATEGIES:
        return {"window_size": draw(WINDOWS), "keep_all_text": draw(st.booleans())}
    if name == "snapkv":
        cfg: dict[str, Any] = {
            "kernel_size": draw(st.sampled_from([1, 3, 5, 7])),
            "pooling": draw(st.sampled_from(["max", "avg"])),
        }
        window = draw(st.one_of(st.none(), st.integers(1, 100)))
        if window is not None:
            cfg["window_size"] = window
        return cfg
    if name == "tova":
        return {
            "head_average": draw(st.sampled_from(["layer", "group"])),
            "window_size": draw(st.integers(0, 40)),
            "decode_eviction": draw(st.booleans()),
        }
    if name == "knorm":
        return {"window_size": draw(st.integers(0, 40))}
    if name == "vl-cache":  # a single layer: the deferred allocation gives it its own n_keep
        return {
            "threshold": draw(st.sampled_from([0.0, 0.01, 0.3])),
            "window_ratio": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
            "shared_heads": draw(st.booleans()),
            "fallback_window": draw(st.integers(1, 40)),
        }
    return {}


named_configs = st.sampled_from(BUILTIN_STRATEGIES).flatmap(lambda n: st.tuples(st.just(n), configs(n)))


def expected_window(name: str, config: dict[str, Any], n_keep: int) -> int:
    """Most recent entries that must be kept (the window, clamped to the budget)."""
    if name == "h2o" or name in LOOKM_STRATEGIES:
        window = config.get("window_size")
        return min(n_keep // 2 if window is None else window, n_keep)
    if name == "snapkv":
        return min(config.get("window_size", 32), n_keep)
    if name in ("tova", "knorm"):
        return min(config.get("window_size", 0), n_keep)
    if name == "vl-cache":
        return min(int(config.get("window_ratio", 0.1) * n_keep), n_keep)
    return 0


def text_outside_window(view: LayerView, b: int, window: int) -> int:
    real = view.real_positions(b).tolist()
    outside = real[: len(real) - window]
    return sum(int(view.modality[b, p]) == Modality.TEXT for p in outside)


def expected_count(name: str, config: dict[str, Any], view: LayerView, b: int) -> int:
    """Entries each KV head of row ``b`` keeps."""
    length, n_keep = view.prompt_lengths[b], view.n_keep[b]
    if name == "full" or n_keep >= length:
        return length
    if config.get("keep_all_text"):
        window = expected_window(name, config, n_keep)
        return window + max(text_outside_window(view, b, window), n_keep - window)
    return n_keep


def check_plan_structure(name: str, config: dict[str, Any], view: LayerView, plan: CompressionPlan) -> None:
    """Shapes, budgets, filler placement, order, padding and window of a plan."""
    batch, kv_heads = view.batch_size, view.kv_heads
    counts = [expected_count(name, config, view, b) for b in range(batch)]
    assert plan.kept_indices.dtype == torch.long
    assert plan.slot_valid.dtype == torch.bool
    assert plan.kept_indices.shape == (batch, kv_heads, max(counts))
    assert plan.slot_valid.shape == (batch, max(counts))
    for b in range(batch):
        n_fill = max(counts) - counts[b]
        assert plan.slot_valid[b].tolist() == [False] * n_fill + [True] * counts[b], "filler slots come first"
        real = real_positions(view.modality[b])
        window = expected_window(name, config, view.n_keep[b]) if counts[b] < len(real) else 0
        for kept in kept_rows(plan, b):
            assert len(kept) == counts[b]
            assert all(x < y for x, y in zip(kept, kept[1:])), "kept entries in ascending original order"
            assert set(kept) <= set(real), "padding is never kept"
            assert set(real[len(real) - window :]) <= set(kept), "the window is always kept"


def check_applied_cache(view: LayerView, plan: CompressionPlan, eviction_only: bool) -> CacheLayer:
    """Apply ``plan`` and check dtype, device, finiteness, filler zeros and (eviction) bit-exactness."""
    cache = CacheLayer(view.keys.clone(), view.values.clone())
    apply_plan(cache, plan)
    for new, old in ((cache.keys, view.keys), (cache.values, view.values)):
        assert new.dtype == old.dtype
        assert new.device == old.device
        assert new.shape == (*plan.kept_indices.shape, old.shape[-1])
        assert torch.isfinite(new.float()).all()
        assert new.untyped_storage().nbytes() == new.numel() * new.element_size(), "cache owns its storage"
        for b in range(view.batch_size):
            valid = plan.slot_valid[b]
            assert (new[b][:, ~valid] == 0).all(), "filler slots are zeroed"
            if eviction_only:
                for h in range(view.kv_heads):
                    expected = old[b, h, plan.kept_indices[b, h][valid]]
                    assert torch.equal(new[b, h][valid], expected), "evicting strategies keep rows bit-exact"
    return cache


@SETTINGS
@given(case=synthetic_cases(), named=named_configs, dtype=DTYPES)
def test_plans_keep_budget_order_window_and_no_padding(
    case: SyntheticCase, named: tuple[str, dict[str, Any]], dtype: torch.dtype
) -> None:
    name, config = named
    view = make_view(case, dtype)
    plan = Compressor.from_name(name, compression_ratio=case.ratio, **config).plan(view)
    check_plan_structure(name, config, view, plan)
    eviction_only = name not in ("lookm-average", "lookm-pivotal", "lookm-weighted")
    if eviction_only:
        assert plan.keys is None and plan.values is None
    check_applied_cache(view, plan, eviction_only)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 100_000), ratio=ratios)
def test_budget_is_int_of_l_times_one_minus_r(length: int, ratio: float) -> None:
    assert n_keep_for(length, ratio) == max(1, int(length * (1 - ratio)))
    assert n_keep_for(90, 0.8) == 17  # evaluated literally with Python floats
    assert n_keep_for(length, 0.0) == length


@settings(max_examples=30, deadline=None)
@given(case=synthetic_cases(ratio=st.just(0.0)), named=named_configs, dtype=DTYPES)
def test_ratio_zero_keeps_everything(
    case: SyntheticCase, named: tuple[str, dict[str, Any]], dtype: torch.dtype
) -> None:
    name, config = named
    view = make_view(case, dtype)
    strategy = Compressor.from_name(name, compression_ratio=0.0, **config)
    assert strategy.is_noop
    plan = strategy.plan(view)
    for b in range(case.batch):
        real = real_positions(view.modality[b])
        assert kept_rows(plan, b) == [real] * case.kv_heads
    # nothing to merge: even merging strategies leave every row bit-exact
    check_applied_cache(view, plan, eviction_only=True)


@SETTINGS
@given(case=synthetic_cases(), named=named_configs, dtype=DTYPES)
def test_plans_are_deterministic(case: SyntheticCase, named: tuple[str, dict[str, Any]], dtype: torch.dtype) -> None:
    name, config = named
    tensors = make_tensors(case, dtype)
    plans = [
        Compressor.from_name(name, compression_ratio=case.ratio, **config).plan(make_view(case, tensors=tensors))
        for _ in range(2)
    ]
    assert torch.equal(plans[0].kept_indices, plans[1].kept_indices)
    assert torch.equal(plans[0].slot_valid, plans[1].slot_valid)
    for first, second in ((plans[0].keys, plans[1].keys), (plans[0].values, plans[1].values)):
        assert (first is None) == (second is None)
        if first is not None and second is not None:
            assert torch.equal(first, second)


def _split(kept: list[int], outside: list[int]) -> tuple[list[int], list[int]]:
    kept_set = set(kept)
    return [p for p in outside if p in kept_set], [p for p in outside if p not in kept_set]


def _assert_top(scores: torch.Tensor, kept: list[int], evicted: list[int], what: str) -> None:
    """Every kept entry scores at least as high as every evicted one (ties either way)."""
    if kept and evicted:
        lowest_kept = float(scores[kept].min())
        highest_evicted = float(scores[evicted].max())
        assert lowest_kept >= highest_evicted - TOL, f"{what}: kept {lowest_kept} < evicted {highest_evicted}"


@SETTINGS
@given(case=synthetic_cases(), window=WINDOWS, decode_eviction=st.booleans())
def test_h2o_keeps_window_plus_highest_accumulated_attention(
    case: SyntheticCase, window: int | None, decode_eviction: bool
) -> None:
    view = make_view(case)
    config = {"window_size": window, "decode_eviction": decode_eviction}
    plan = Compressor.from_name("h2o", compression_ratio=case.ratio, **config).plan(view)
    check_plan_structure("h2o", config, view, plan)
    scores = naive_h2o_scores(view)
    for b in range(case.batch):
        real = real_positions(view.modality[b])
        w = expected_window("h2o", config, view.n_keep[b])
        for h, kept in enumerate(kept_rows(plan, b)):
            _assert_top(scores[b, h], *_split(kept, real[: len(real) - w]), "h2o")


@SETTINGS
@given(
    case=synthetic_cases(),
    window=st.one_of(st.none(), st.integers(1, 100)),
    kernel=st.sampled_from([1, 3, 5, 7]),
    pooling=st.sampled_from(["max", "avg"]),
)
def test_snapkv_keeps_window_plus_highest_pooled_window_attention(
    case: SyntheticCase, window: int | None, kernel: int, pooling: str
) -> None:
    view = make_view(case)
    config: dict[str, Any] = {"kernel_size": kernel, "pooling": pooling}
    if window is not None:
        config["window_size"] = window
    plan = Compressor.from_name("snapkv", compression_ratio=case.ratio, **config).plan(view)
    check_plan_structure("snapkv", config, view, plan)
    w = config.get("window_size", 32)
    expected = naive_snapkv_scores(view, w, kernel, pooling)
    for b in range(case.batch):
        real = real_positions(view.modality[b])
        n_keep = view.n_keep[b]
        if n_keep >= len(real):
            continue
        if n_keep <= w:  # the last n_keep entries
            assert kept_rows(plan, b) == [real[len(real) - n_keep :]] * case.kv_heads
            continue
        prefix = real[: len(real) - w]
        for h, kept in enumerate(kept_rows(plan, b)):
            by_position = torch.zeros(view.seq_len, dtype=torch.float64)
            by_position[prefix] = expected[b][h]
            _assert_top(by_position, *_split(kept, prefix), "snapkv")


@SETTINGS
@given(
    case=synthetic_cases(),
    name=st.sampled_from(LOOKM_STRATEGIES),
    window=WINDOWS,
    keep_all_text=st.booleans(),
)
def test_lookm_text_prior(case: SyntheticCase, name: str, window: int | None, keep_all_text: bool) -> None:
    view = make_view(case)
    config = {"window_size": window, "keep_all_text": keep_all_text}
    plan = Compressor.from_name(name, compression_ratio=case.ratio, **config).plan(view)
    check_plan_structure(name, config, view, plan)
    scores = naive_h2o_scores(view)
    for b in range(case.batch):
        real = real_positions(view.modality[b])
        if view.n_keep[b] >= len(real):
            continue
        w = expected_window(name, config, view.n_keep[b])
        outside = real[: len(real) - w]
        text = [p for p in outside if int(view.modality[b, p]) == Modality.TEXT]
        media = [p for p in outside if int(view.modality[b, p]) != Modality.TEXT]
        for h, kept in enumerate(kept_rows(plan, b)):
            kept_text, evicted_text = _split(kept, text)
            kept_media, evicted_media = _split(kept, media)
            assert not (kept_media and evicted_text), "an image entry kept while a text entry is evicted"
            if keep_all_text:
                assert not evicted_text, "keep_all_text keeps every text entry"
            _assert_top(scores[b, h], kept_text, evicted_text, "lookm text")
            _assert_top(scores[b, h], kept_media, evicted_media, "lookm media")


@settings(max_examples=30, deadline=None)
@given(case=synthetic_cases(patterns=("text",)), window=WINDOWS)
def test_lookm_equals_h2o_on_text_only_prompts(case: SyntheticCase, window: int | None) -> None:
    tensors = make_tensors(case)
    h2o = Compressor.from_name("h2o", compression_ratio=case.ratio, window_size=window, decode_eviction=False)
    lookm = Compressor.from_name("lookm-evict", compression_ratio=case.ratio, window_size=window)
    h2o_plan = h2o.plan(make_view(case, tensors=tensors))
    lookm_plan = lookm.plan(make_view(case, tensors=tensors))
    assert torch.equal(h2o_plan.kept_indices, lookm_plan.kept_indices)
    assert torch.equal(h2o_plan.slot_valid, lookm_plan.slot_valid)
    # keep_all_text on a prompt without images: not compressed at all
    everything = Compressor.from_name(
        "lookm-evict", compression_ratio=case.ratio, window_size=window, keep_all_text=True
    )
    plan = everything.plan(make_view(case, tensors=tensors))
    for b in range(case.batch):
        assert kept_rows(plan, b) == [real_positions(tensors["modality"][b])] * case.kv_heads


@SETTINGS
@given(case=synthetic_cases(), sink=st.one_of(st.none(), st.integers(0, 12)))
def test_streaming_keeps_sinks_and_recent_entries(case: SyntheticCase, sink: int | None) -> None:
    view = make_view(case)
    config = {} if sink is None else {"sink_tokens": sink}
    plan = Compressor.from_name("streaming", compression_ratio=case.ratio, **config).plan(view)
    sink_tokens = 4 if sink is None else sink
    for b in range(case.batch):
        real = real_positions(view.modality[b])
        n_keep = min(view.n_keep[b], len(real))
        if n_keep <= sink_tokens:
            expected = real[:n_keep]
        else:
            expected = real[:sink_tokens] + real[len(real) - (n_keep - sink_tokens) :]
        assert kept_rows(plan, b) == [expected] * case.kv_heads


@settings(max_examples=25, deadline=None)
@given(
    case=synthetic_cases(),
    seed=st.integers(0, 10_000),
    other=st.integers(1, 10_000),
)
def test_random_is_seeded(case: SyntheticCase, seed: int, other: int) -> None:
    tensors = make_tensors(case)

    def plan(s: int, layer_idx: int = case.layer_idx) -> CompressionPlan:
        view = make_view(case, tensors=tensors)
        view.layer_idx = layer_idx
        return Compressor.from_name("random", compression_ratio=case.ratio, seed=s).plan(view)

    first = plan(seed)
    check_plan_structure("random", {}, make_view(case, tensors=tensors), first)
    assert torch.equal(first.kept_indices, plan(seed).kept_indices)


def test_random_differs_across_seeds_and_layers() -> None:
    # 3 rows x 2 KV heads keeping 40 of 80: the chance of two seeds agreeing is ~ C(80, 40)^-6
    case = SyntheticCase(2, 2, 4, (80, 80, 70), ((0,) * 80, (1,) * 80, (0,) * 70), 0.5, 11, layer_idx=3)
    tensors = make_tensors(case)
    plans = {}
    for seed, layer_idx in ((0, 3), (1, 3), (2, 3), (0, 4)):
        view = make_view(case, tensors=tensors)
        view.layer_idx = layer_idx
        plans[seed, layer_idx] = Compressor.from_name("random", compression_ratio=0.5, seed=seed).plan(view)
    kept = [p.kept_indices for p in plans.values()]
    for i in range(len(kept)):
        for j in range(i + 1, len(kept)):
            assert not torch.equal(kept[i], kept[j])
    # not a fixed pattern: the KV heads of a row choose differently
    assert not torch.equal(kept[0][0, 0], kept[0][0, 1])


@settings(max_examples=25, deadline=None)
@given(case=synthetic_cases())
def test_full_keeps_everything_whatever_the_ratio(case: SyntheticCase) -> None:
    view = make_view(case)
    plan = Compressor.from_name("full", compression_ratio=case.ratio).plan(view)
    for b in range(case.batch):
        assert kept_rows(plan, b) == [real_positions(view.modality[b])] * case.kv_heads
    assert Compressor.from_name("full", compression_ratio=case.ratio).is_noop
