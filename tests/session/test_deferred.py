"""Strategies that plan every layer at the end of the prefill (``defers_plans``): the session's mechanism.

A toy deferring strategy records what the session asks of it: one ``observe`` per layer right
after its prefill attention (the layer's cache still full), one ``plan_deferred`` after the
last layer with every layer's view (queries released), then all plans applied before the first
decode step. Also: ``num_layers`` and ``call_state`` on the views, errors, and vl-cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
import torch

from kvpress_mm import CompressionPlan, Compressor, LayerView
from kvpress_mm.errors import InvalidPlanError
from kvpress_mm.ops.selection import select_top_with_window
from tests.helpers.masked_reference import PlanRecorder, cache_of
from tests.helpers.tiny_models import (
    assert_same_model_state,
    build,
    generate,
    hook_count,
    left_padded,
    model_snapshot,
    prompt,
)

RATIO = 0.6
NEW_TOKENS = 3


class DeferredKeyNorm(Compressor):
    """Keeps the lowest key norms, planned for all layers at once; logs what the session asks."""

    log: ClassVar[list[Any]] = []
    wrong_count: ClassVar[bool] = False

    @property
    def defers_plans(self) -> bool:
        return True

    def observe(self, layer: LayerView) -> None:
        self.log.append(("observe", layer.layer_idx, layer.num_layers, layer.seq_len, id(layer.call_state)))
        layer.state["norms"] = -layer.keys.float().norm(dim=-1)
        layer.call_state.setdefault("observed", []).append(layer.layer_idx)

    def plan(self, layer: LayerView) -> CompressionPlan:
        raise AssertionError("a deferring strategy is planned through plan_deferred")

    def plan_deferred(self, layers: Sequence[LayerView]) -> list[CompressionPlan]:
        self.log.append(("plan", [layer.layer_idx for layer in layers], list(layers[0].call_state["observed"])))
        for layer in layers:
            with pytest.raises(InvalidPlanError, match="released after observe"):
                _ = layer.queries
        plans = [select_top_with_window(layer, layer.state.pop("norms"), 0) for layer in layers]
        return plans[:-1] if self.wrong_count else plans


@pytest.fixture(autouse=True)
def clear_log() -> None:
    DeferredKeyNorm.log.clear()
    DeferredKeyNorm.wrong_count = False


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_observe_each_layer_then_plan_all_after_the_last(impl: str) -> None:
    model = build("llama", impl, num_hidden_layers=3)
    ids, mask, _ = left_padded([17, 24], seed=1)
    width = ids.shape[1]
    # what layer 0's cache holds whenever layer 2 runs its attention
    seen: list[int] = []
    last = model.model.layers[2].self_attn  # type: ignore[union-attr,index]

    def before_last(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append(int(cache.layers[0].keys.shape[-2]))

    reference = generate(model, ids, mask, max_new_tokens=NEW_TOKENS)
    recorder = PlanRecorder()
    handle = last.register_forward_pre_hook(before_last, with_kwargs=True)
    try:
        with recorder.recording(), DeferredKeyNorm(compression_ratio=RATIO)(model) as session:
            out = generate(model, ids, mask, max_new_tokens=NEW_TOKENS)
            handle.remove()
            generate(model, ids, mask, max_new_tokens=NEW_TOKENS)  # a second prefill: a new call_state
    finally:
        handle.remove()
    first_call = DeferredKeyNorm.log[:4]
    assert [entry[:4] for entry in first_call[:3]] == [("observe", layer, 3, width) for layer in range(3)]
    assert len({entry[4] for entry in first_call[:3]}) == 1, "one call_state shared by the layers of a prefill"
    assert first_call[3] == ("plan", [0, 1, 2], [0, 1, 2])
    assert DeferredKeyNorm.log[4][4] != first_call[0][4], "each prefill call gets its own call_state"
    n_keep = [int(n * (1 - RATIO)) for n in mask.sum(-1).tolist()]
    # layer 0 was still uncompressed during layer 2's prefill attention, and compressed before the first decode step
    assert seen == [width, max(n_keep) + 1, max(n_keep) + 2]
    assert torch.equal(out.logits[0], reference.logits[0]), "the prefill's output is the model's own"
    # after the prefill every layer holds its budget, applied once (no decode eviction)
    assert session.report.layers_compressed == 3  # the report of the last prefill
    plans = recorder.per_layer(cache_of(out))
    assert sorted(plans) == [0, 1, 2]
    for layer_plans in plans.values():
        assert len(layer_plans) == 1 and layer_plans[0].length_before == width
        assert layer_plans[0].slot_valid.sum(-1).tolist() == n_keep
    assert [layer.keys.shape[-2] for layer in cache_of(out).layers] == [max(n_keep) + NEW_TOKENS - 1] * 3


def test_a_wrong_number_of_deferred_plans_raises_and_leaves_the_model_alone() -> None:
    model = build("qwen2", "sdpa")
    before, hooks = model_snapshot(model), hook_count(model)
    DeferredKeyNorm.wrong_count = True
    with pytest.raises(InvalidPlanError, match=r"plan_deferred\(\) returned 1 plans for 2 layers"):
        with DeferredKeyNorm(compression_ratio=RATIO)(model):
            generate(model, prompt(20), max_new_tokens=2)
    assert_same_model_state(before, model_snapshot(model))
    assert hook_count(model) == hooks


def test_strategies_that_do_not_defer_are_never_asked_to_observe() -> None:
    calls: list[int] = []

    class Observed(Compressor):
        def observe(self, layer: LayerView) -> None:
            calls.append(layer.layer_idx)

        def plan(self, layer: LayerView) -> CompressionPlan:
            assert layer.num_layers == 2 and layer.call_state == {}
            return select_top_with_window(layer, -layer.keys.float().norm(dim=-1), 0)

    model = build("llama", "sdpa")
    with Observed(compression_ratio=RATIO)(model):
        generate(model, prompt(20), max_new_tokens=2)
    assert calls == []


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_vl_cache_deferred_and_online_keep_exact_totals_and_the_prefill_output(family: str) -> None:
    model = build(family, "eager", num_hidden_layers=4)
    ids = prompt(40, seed=3)
    reference = generate(model, ids, max_new_tokens=NEW_TOKENS)
    n_keep = int(40 * (1 - RATIO))
    kept = {}
    for allocation in ("deferred", "online"):
        recorder = PlanRecorder()
        strategy = Compressor.from_name("vl-cache", compression_ratio=RATIO, allocation=allocation, threshold=0.3)
        with recorder.recording(), strategy(model):
            out = generate(model, ids, max_new_tokens=NEW_TOKENS)
        kept[allocation] = [plans[0].length_after for plans in recorder.per_layer(cache_of(out)).values()]
        assert sum(kept[allocation]) == 4 * n_keep
        assert torch.equal(out.logits[0], reference.logits[0])
    # online: the first layer gets the mean budget (its density is its own running mean)
    assert kept["online"][0] == n_keep
