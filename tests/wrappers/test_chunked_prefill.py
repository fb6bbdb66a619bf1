"""``chunked-prefill(inner)``: the wrapper against the chunked reference, its budgets and peak, every inner, configs."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_mm import Compressor
from kvpress_mm.strategies import BUILTIN_STRATEGIES
from tests.helpers import tiny_qwen_vlms as tq
from tests.helpers import tiny_vlms as tv
from tests.helpers.chunked_reference import (
    budget,
    chunked_prefill_reference,
    kept_columns,
    modality_from_ids,
)
from tests.helpers.masked_reference import PlanRecorder, cache_of
from tests.helpers.tiny_models import build, generate, left_padded
from tests.strategies.test_strategy_properties import configs

ATOL = 1e-4
RATIO = 0.5


def chunked_prefill(inner: str | dict[str, Any], chunk_size: int, **config: Any) -> Compressor:
    return Compressor.from_name("chunked-prefill", inner=inner, chunk_size=chunk_size, **config)


@pytest.mark.parametrize(
    "inner",
    [
        {"strategy": "snapkv", "window_size": 4},
        {"strategy": "pyramid", "inner": {"strategy": "snapkv", "window_size": 3}},
        {"strategy": "mixkv", "inner": "h2o"},
        {"strategy": "vl-cache", "allocation": "online", "fallback_window": 4},
    ],
    ids=lambda inner: inner["strategy"],
)
def test_the_wrapper_equals_the_chunked_reference_of_its_inner(inner: dict[str, Any]) -> None:
    model = build("llama", "sdpa", seed=11)
    ids, mask, _ = left_padded([33, 21], seed=12)
    strategy = chunked_prefill(inner, 8, compression_ratio=RATIO)
    recorder = PlanRecorder()
    with recorder.recording(), strategy(model):
        out = generate(model, ids, mask, max_new_tokens=1)
    reference = chunked_prefill_reference(model, ids, mask, modality_from_ids(ids, mask, -1), strategy.inner, 8, RATIO)
    for layer, plans in recorder.per_layer(cache_of(out)).items():
        assert torch.equal(kept_columns(plans, 8, int(ids.shape[1])), reference.kept[layer])
    torch.testing.assert_close(out.logits[0], reference.logits[:, -1], atol=ATOL, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    inner=st.sampled_from([n for n in BUILTIN_STRATEGIES if n not in ("full", "vl-cache")]).flatmap(
        lambda name: st.tuples(st.just(name), configs(name))
    ),
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    chunk_size=st.integers(1, 24),
    ratio=st.sampled_from([0.0, 0.25, 0.5, 0.8]),
)
def test_every_builtin_inner_keeps_its_budget_and_never_holds_more_than_a_chunk_above_it(
    inner: tuple[str, dict[str, Any]], lengths: list[int], chunk_size: int, ratio: float
) -> None:
    """After the prefill each row keeps exactly the inner's budget of its prompt in every layer and KV head;
    during it, a layer never holds more than its budget after the previous chunk plus one chunk. Ratio 0:
    nothing changes (transformers' output, bit for bit)."""
    name, config = inner
    config = {**config, "keep_all_text": False} if "keep_all_text" in config else config
    model = build("llama", "sdpa", seed=13)
    ids, mask, _ = left_padded(lengths, seed=14)
    strategy = chunked_prefill({"strategy": name, **config}, chunk_size, compression_ratio=ratio)
    recorder = PlanRecorder()
    with recorder.recording(), strategy(model) as session:
        out = generate(model, ids, mask, max_new_tokens=2)
    if ratio == 0:
        assert strategy.is_noop and not recorder.applied
        plain = generate(model, ids, mask, max_new_tokens=2)
        assert torch.equal(out.sequences, plain.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.logits, plain.logits, strict=True))
        return
    width = int(ids.shape[1])
    real = [int(n) for n in mask.sum(-1).tolist()]
    assert session.report.n_keep == tuple(budget(n, ratio) for n in real)
    for plans in recorder.per_layer(cache_of(out)).values():
        prefill = plans[: -(-width // chunk_size)]
        final = prefill[-1]
        assert final.slot_valid.sum(-1).tolist() == list(session.report.n_keep)
        held_before = 0
        for index, plan in enumerate(prefill):
            end = min(width, (index + 1) * chunk_size)
            assert plan.length_before == held_before + end - index * chunk_size
            seen = [int(n) for n in mask[:, :end].sum(-1).tolist()]
            assert plan.slot_valid.sum(-1).tolist() == [min(budget(n, ratio), n) for n in seen]
            held_before = plan.length_after


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("inner", ["lookm-pivotal", "tova", {"strategy": "h2o", "decode_eviction": True}])
def test_vlm_batches_generate_with_merging_and_decode_evicting_inners(family: str, inner: Any) -> None:
    if family == "llava":
        model = tv.build_vlm("llava")
        ids, mask, pixels = tv.left_pad_batch(
            "llava", [tv.make_prompt("llava", model, 2, seed=1), tv.make_prompt("llava", model, 1, seed=2)]
        )
        inputs, run = {"input_ids": ids, "attention_mask": mask, **pixels}, tv.generate_vlm
    else:
        model = tq.build("qwen2_vl")
        inputs = tq.batch(
            [tq.prompt(model, [5, ("image", (4, 6)), 7], seed=2), tq.prompt(model, [3, ("image", (4, 4)), 9], seed=3)]
        )
        run = tq.generate
    with chunked_prefill(inner, 6, compression_ratio=0.6)(model) as session:
        out = run(model, inputs, max_new_tokens=4)
    expected = max(session.report.n_keep)
    grows = not isinstance(inner, dict)  # h2o's decode eviction holds each layer at its size
    for layer in cache_of(out).layers:
        assert layer.keys.shape[-2] == expected + (3 if grows else 0)
    assert torch.isfinite(torch.stack(list(out.logits))).all()


def test_ratio_zero_and_a_full_inner_are_bit_identical_to_no_compression() -> None:
    model = build("llama", "eager", seed=15)
    ids, mask, _ = left_padded([30, 17], seed=16)
    plain = generate(model, ids, mask, max_new_tokens=5)
    for strategy in (chunked_prefill("snapkv", 4, compression_ratio=0.0), chunked_prefill("full", 4)):
        assert strategy.is_noop
        with strategy(model):
            out = generate(model, ids, mask, max_new_tokens=5)
        assert torch.equal(out.sequences, plain.sequences)
        for a, b in zip(out.logits, plain.logits, strict=True):
            assert torch.equal(a, b)
        for a, b in zip(cache_of(out).layers, cache_of(plain).layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_decoding_around_chunked_prefill_chunks_the_prompt_and_bounds_decoding() -> None:
    model = build("llama", "sdpa", seed=17)
    ids, mask, _ = left_padded([40, 26], seed=18)
    for strategy in (
        Compressor.from_name(
            "decoding",
            inner={"strategy": "chunked-prefill", "inner": "snapkv", "chunk_size": 8},
            max_entries=24,
            interval=4,
        ),
        chunked_prefill({"strategy": "decoding", "inner": "snapkv", "max_entries": 24, "interval": 4}, 8),
    ):
        recorder = PlanRecorder()
        with recorder.recording(), strategy(model) as session:
            out = generate(model, ids, mask, max_new_tokens=20)
        plans = recorder.per_layer(cache_of(out))[0]
        assert [p.length_before for p in plans[:5]] == [8, 12, 16, 20, 24]  # chunks on budgets of what was seen
        assert session.report.n_keep == (20, 13)
        assert max(p.length_before for p in plans) == 24
        assert all(layer.keys.shape[-2] < 24 for layer in cache_of(out).layers)


CONFIGS = [
    {"strategy": "chunked-prefill", "inner": "snapkv", "chunk_size": 128},
    {"strategy": "chunked-prefill", "inner": {"strategy": "pyramid", "inner": "h2o"}, "compression_ratio": 0.8},
    {"strategy": "chunked-prefill", "inner": {"strategy": "vl-cache", "allocation": "online"}},
]


@pytest.mark.parametrize("config", CONFIGS)
def test_configs_round_trip(config: dict[str, Any]) -> None:
    strategy = Compressor.from_config(config)
    assert Compressor.from_config(strategy.to_config()) == strategy
    assert strategy.prefill_chunk_size == strategy.chunk_size  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("config", "field", "message"),
    [
        ({"inner": "vl-cache"}, "inner", "allocation='online'"),
        ({"inner": {"strategy": "mixkv", "inner": "vl-cache"}}, "inner", "allocation='online'"),
        ({"inner": "modality-budget"}, "inner", "cannot wrap modality-budget"),
        ({"inner": {"strategy": "mixkv", "inner": "modality-budget"}}, "inner", "cannot wrap modality-budget"),
        ({"inner": "chunked-prefill"}, "inner", "chunked-prefill(chunked-prefill(...)) is meaningless"),
        ({"inner": {"strategy": "decoding", "inner": "chunked-prefill"}}, "inner", "is meaningless"),
        ({"inner": {"strategy": "lookm-evict", "keep_all_text": True}}, "inner", "keep_all_text"),
        ({"chunk_size": 0}, "chunk_size", "greater than or equal to 1"),
        ({"inner": "nope"}, "inner", "unknown strategy 'nope'"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(config: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_name("chunked-prefill", **config)
    assert message in str(caught.value), str(caught.value)
    assert any(error["loc"][:1] == (field,) for error in caught.value.errors()), caught.value.errors()


def test_flags_follow_the_inner() -> None:
    strategy = chunked_prefill({"strategy": "h2o", "decode_eviction": True}, 16)
    assert strategy.needs_accumulated_attention and strategy.acts_while_decoding
    assert not chunked_prefill("snapkv", 16).acts_while_decoding
    assert chunked_prefill("pyramid", 16).allocates_budgets
    assert chunked_prefill("snapkv", 16, compression_ratio=0.8).budgets(torch.zeros(1, 10, dtype=torch.int8)) == (1,)
