"""``decoding(inner)``: the decode-time bound, its re-plans against a replayed reference, configs and refusals."""

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
from tests.helpers.chunked_reference import modality_from_ids
from tests.helpers.decoding_reference import decoding_reference
from tests.helpers.masked_reference import PlanRecorder, cache_of
from tests.helpers.tiny_models import build, generate, left_padded
from tests.strategies.test_strategy_properties import configs

ATOL = 1e-4
RATIO = 0.5
MAX_ENTRIES, INTERVAL = 24, 5
NEW_TOKENS = 22

# inners that keep the entries as they are (merging LOOK-M changes keys and values: the masked reference cannot)
INNERS: list[tuple[str, dict[str, Any]]] = [
    ("snapkv", {"window_size": 4}),
    ("snapkv", {"window_size": 32}),  # a window larger than the buffer: every buffered query
    ("h2o", {"decode_eviction": False}),
    ("streaming", {}),
    ("tova", {}),
    ("knorm", {}),
    ("random", {"seed": 3}),
    ("lookm-evict", {}),
]


def _ids(case: tuple[str, dict[str, Any]]) -> str:
    name, config = case
    return name + "".join(f"-{k}={v}" for k, v in config.items())


def decoding(inner: str | dict[str, Any], **config: Any) -> Compressor:
    options = {"max_entries": MAX_ENTRIES, "interval": INTERVAL, "compression_ratio": RATIO, **config}
    return Compressor.from_name("decoding", inner=inner, **options)


class LengthProbe:
    """The length of every compressed layer after every model call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.after_calls: list[list[int]] = []
        self._handle = model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        cache = getattr(output, "cache", None)
        if cache is not None:
            self.after_calls.append([int(layer.keys.shape[-2]) for layer in cache.layers])

    def remove(self) -> None:
        self._handle.remove()


def _check_against_reference(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    inner: Compressor,
    run: Any,
    *,
    image_id: int = -1,
    full_extra: dict[str, Any] | None = None,
    explicit_positions: bool = True,
) -> None:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    width = int(ids.shape[1])
    strategy = decoding(inner.to_config())
    recorder, probe = PlanRecorder(), LengthProbe(model)
    try:
        with recorder.recording(), strategy(model):
            out = run(model, inputs, max_new_tokens=NEW_TOKENS)
    finally:
        probe.remove()
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], NEW_TOKENS, dtype=mask.dtype)], dim=1)
    reference = decoding_reference(
        model,
        out.sequences,
        full_mask,
        modality_from_ids(ids, mask, image_id),
        inner,
        RATIO,
        MAX_ENTRIES,
        INTERVAL,
        full_extra,
        explicit_positions,
    )
    for step in range(NEW_TOKENS):
        torch.testing.assert_close(out.logits[step], reference.logits[:, width - 1 + step], atol=ATOL, rtol=0)
    plans = recorder.per_layer(cache_of(out))
    for layer, layer_plans in plans.items():
        decode_plans = layer_plans[1:]  # the first is the prefill's
        assert len(decode_plans) == len(reference.replans[layer]) > 0
        # a layer is re-planned when it holds max_entries (the step's entry included), down to the target
        assert all(p.length_before == MAX_ENTRIES for p in decode_plans)
        assert all(p.length_after <= MAX_ENTRIES - INTERVAL for p in decode_plans)
        assert reference.most_held[layer] == MAX_ENTRIES
    # the invariant: after every call every layer holds fewer than max_entries (the next step's entry fits)
    assert max(max(lengths) for lengths in probe.after_calls) < MAX_ENTRIES


def _text_run(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    return generate(model, inputs["input_ids"], inputs["attention_mask"], **kwargs)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("case", INNERS, ids=_ids)
def test_text_batch_re_plans_as_the_replayed_reference(case: tuple[str, dict[str, Any]], impl: str) -> None:
    name, config = case
    model = build("llama", impl, seed=1)
    ids, mask, _ = left_padded([30, 19], seed=3)
    inner = Compressor.from_name(name, compression_ratio=RATIO, **config)
    _check_against_reference(model, {"input_ids": ids, "attention_mask": mask}, inner, _text_run)


def test_llava_batch_re_plans_as_the_replayed_reference() -> None:
    model = tv.build_vlm("llava")
    prompts = [tv.make_prompt("llava", model, 2, seed=1), tv.make_prompt("llava", model, 1, seed=2)]
    ids, mask, pixels = tv.left_pad_batch("llava", prompts)
    inner = Compressor.from_name("lookm-evict", compression_ratio=RATIO)
    _check_against_reference(
        model,
        {"input_ids": ids, "attention_mask": mask, **pixels},
        inner,
        tv.generate_vlm,
        image_id=int(model.config.image_token_id),
        full_extra=pixels,
    )


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_qwen_vl_batch_re_plans_as_the_replayed_reference(kind: str) -> None:
    model = tq.build(kind)
    inputs = tq.batch(
        [tq.prompt(model, [5, ("image", (4, 6)), 7], seed=2), tq.prompt(model, [3, ("image", (4, 4)), 9], seed=3)]
    )
    inner = Compressor.from_name("snapkv", compression_ratio=RATIO, window_size=4)
    width = int(inputs["input_ids"].shape[1])
    _check_against_reference(
        model,
        inputs,
        inner,
        tq.generate,
        image_id=int(model.config.image_token_id),
        full_extra=tq.reference_inputs(inputs, width + NEW_TOKENS),
        explicit_positions=False,
    )


def test_a_prompt_budget_at_the_bound_starts_at_the_target() -> None:
    model = build("llama", "sdpa", seed=2)
    ids, mask, _ = left_padded([60, 40, 20], seed=4)  # budgets 30 (>= 24: 19), 20, 10
    with decoding("snapkv")(model) as session:
        out = generate(model, ids, mask, max_new_tokens=1)
    assert session.report.n_keep == (MAX_ENTRIES - INTERVAL, 20, 10)
    assert all(layer.keys.shape[-2] == 20 for layer in cache_of(out).layers)


def test_beam_search_and_a_second_turn_keep_the_bound() -> None:
    model = build("llama", "sdpa", seed=3)
    ids, mask, _ = left_padded([30, 22], seed=5)
    probe = LengthProbe(model)
    try:
        with decoding("snapkv")(model):
            beams = generate(model, ids, mask, max_new_tokens=15, num_beams=2)
            out = generate(model, ids, mask, max_new_tokens=6)
            # a second turn on the compressed cache: the last generated token and 9 more in one call
            turn = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
            history = torch.cat([mask, torch.ones(2, 6 + 9, dtype=mask.dtype)], dim=1)
            model.generate(
                input_ids=torch.cat([out.sequences[:, -1:], turn], dim=1),
                attention_mask=history,
                cache=cache_of(out),
                max_new_tokens=12,
                do_sample=False,
                return_dict_in_generate=True,
            )
    finally:
        probe.remove()
    assert beams.sequences.shape[-1] == ids.shape[-1] + 15
    assert max(max(lengths) for lengths in probe.after_calls) < MAX_ENTRIES


def test_ratio_zero_and_a_full_inner_are_bit_identical_to_no_compression() -> None:
    model = build("llama", "sdpa", seed=4)
    ids, mask, _ = left_padded([30, 19], seed=6)
    plain = generate(model, ids, mask, max_new_tokens=30)
    for strategy in (decoding("snapkv", compression_ratio=0.0), decoding("full")):
        assert strategy.is_noop
        with strategy(model):
            out = generate(model, ids, mask, max_new_tokens=30)
        assert torch.equal(out.sequences, plain.sequences)
        for a, b in zip(out.logits, plain.logits, strict=True):
            assert torch.equal(a, b)
        for a, b in zip(cache_of(out).layers, cache_of(plain).layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("name", BUILTIN_STRATEGIES)
def test_every_builtin_inner_is_bounded_or_refused_with_a_reason(name: str) -> None:
    model = build("llama", "sdpa", seed=5)
    ids, mask, _ = left_padded([30, 19], seed=7)
    if name == "vl-cache":
        with pytest.raises(pydantic.ValidationError, match="allocates per-layer or per-modality budgets"):
            decoding(name)
        return
    if name == "full":
        assert decoding(name).is_noop  # nothing to re-plan with: transformers' cache, unbounded
        return
    if name == "h2o":
        with pytest.raises(pydantic.ValidationError, match="decode_eviction=False"):
            decoding(name)
        return
    probe = LengthProbe(model)
    try:
        with decoding(name)(model):
            generate(model, ids, mask, max_new_tokens=25)
    finally:
        probe.remove()
    assert max(max(lengths) for lengths in probe.after_calls) < MAX_ENTRIES


CONFIGS = [
    {"strategy": "decoding", "inner": "snapkv", "max_entries": 512, "interval": 64},
    {"strategy": "decoding", "inner": {"strategy": "h2o", "decode_eviction": False}, "compression_ratio": 0.8},
    {"strategy": "decoding", "inner": {"strategy": "chunked-prefill", "inner": "tova", "chunk_size": 64}},
    {"strategy": "decoding", "inner": {"strategy": "mixkv", "inner": "snapkv"}},
]


@pytest.mark.parametrize("config", CONFIGS)
def test_configs_round_trip(config: dict[str, Any]) -> None:
    strategy = Compressor.from_config(config)
    assert Compressor.from_config(strategy.to_config()) == strategy
    assert Compressor.from_config(strategy.model_dump(mode="json") | {"strategy": "decoding"}) == strategy


@pytest.mark.parametrize(
    ("config", "field", "message"),
    [
        ({"inner": "h2o"}, "inner", "'h2o' with decode_eviction=False"),
        ({"inner": {"strategy": "tova", "decode_eviction": True}}, "inner", "'tova' with decode_eviction=False"),
        (
            {"inner": {"strategy": "chunked-prefill", "inner": "h2o"}},
            "inner",
            "'h2o' with decode_eviction=False",
        ),
        ({"inner": "pyramid"}, "inner", "allocates per-layer or per-modality budgets"),
        ({"inner": "modality-budget"}, "inner", "allocates per-layer or per-modality budgets"),
        ({"inner": {"strategy": "mixkv", "inner": "vl-cache"}}, "inner", "allocates per-layer"),
        ({"inner": "decoding"}, "inner", "decoding(decoding(...)) is meaningless"),
        ({"inner": "adakv"}, "inner", "decoding cannot wrap adakv"),  # ragged heads, one size per re-plan
        ({"inner": {"strategy": "chunked-prefill", "inner": "adakv"}}, "inner", "decoding cannot wrap adakv"),
        ({"inner": {"strategy": "lookm-evict", "keep_all_text": True}}, "inner", "keep_all_text"),
        ({"inner": "snapkv", "compression_ratio": 0.5, "max_entries": 8, "interval": 8}, None, "smaller than"),
        ({"max_entries": 1}, "max_entries", "greater than or equal to 2"),
        ({"interval": 0}, "interval", "greater than or equal to 1"),
        ({"inner": {"strategy": "snapkv", "compression_ratio": 0.3}}, "inner", "Set compression_ratio on"),
        ({"inner": "snapKV"}, "inner", "Did you mean 'snapkv'"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(config: dict[str, Any], field: str | None, message: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Compressor.from_name("decoding", **config)
    assert message in str(caught.value), str(caught.value)
    if field is not None:
        assert any(error["loc"][:1] == (field,) for error in caught.value.errors()), caught.value.errors()


def test_flags() -> None:
    strategy = decoding({"strategy": "h2o", "decode_eviction": False})
    assert strategy.acts_while_decoding and strategy.needs_accumulated_attention and strategy.target == 19
    assert strategy.prefill_chunk_size is None
    chunked = decoding({"strategy": "chunked-prefill", "inner": "snapkv", "chunk_size": 16})
    assert chunked.prefill_chunk_size == 16
    assert not decoding("snapkv").is_noop


@pytest.mark.parametrize("family", [*tv.FAMILIES, *tq.KINDS])
def test_every_vlm_family_batch_stays_within_the_bound(family: str) -> None:
    """decoding(chunked-prefill(snapkv)) on a padded batch with images: chunked prompt, bounded decoding."""
    if family in tq.KINDS:
        model = tq.build(family)
        inputs = tq.batch(
            [tq.prompt(model, [5, ("image", (4, 6)), 7], seed=2), tq.prompt(model, [3, ("image", (4, 4)), 9], seed=3)]
        )
        run = tq.generate
    else:
        model = tv.build_vlm(family)
        prompts = [tv.make_prompt(family, model, 2, seed=1), tv.make_prompt(family, model, 1, seed=2)]
        ids, mask, pixels = tv.left_pad_batch(family, prompts)
        inputs, run = {"input_ids": ids, "attention_mask": mask, **pixels}, tv.generate_vlm
    strategy = decoding({"strategy": "chunked-prefill", "inner": "snapkv", "chunk_size": 6}, max_entries=16, interval=4)
    probe = LengthProbe(model)
    try:
        with strategy(model) as session:
            out = run(model, inputs, max_new_tokens=NEW_TOKENS)
    finally:
        probe.remove()
    assert session.report.kv_bytes_peak > 0 and all(n <= 16 for n in session.report.n_keep)
    assert max(max(lengths) for lengths in probe.after_calls) < 16
    assert torch.isfinite(torch.stack(list(out.logits))).all()


# -- properties over every built-in inner ---------------------------------------------------------


@st.composite
def decoding_inners(draw: st.DrawFn) -> dict[str, Any]:
    """A built-in inner strategy ``decoding`` accepts, with a random valid config."""
    name = draw(st.sampled_from([n for n in BUILTIN_STRATEGIES if n not in ("full", "vl-cache")]))
    config = draw(configs(name))
    if "decode_eviction" in config:
        config["decode_eviction"] = False
    if "keep_all_text" in config:
        config["keep_all_text"] = False
    return {"strategy": name, **config}


@settings(max_examples=20, deadline=None)
@given(
    inner=decoding_inners(),
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    bound=st.integers(2, 30).flatmap(lambda m: st.tuples(st.just(m), st.integers(1, m - 1))),
    ratio=st.sampled_from([0.0, 0.3, 0.7]),
)
def test_every_builtin_inner_keeps_the_bound_and_ratio_zero_is_a_no_op(
    inner: dict[str, Any], lengths: list[int], bound: tuple[int, int], ratio: float
) -> None:
    max_entries, interval = bound
    strategy = Compressor.from_name(
        "decoding", inner=inner, max_entries=max_entries, interval=interval, compression_ratio=ratio
    )
    model = build("llama", "sdpa", seed=9)
    ids, mask, _ = left_padded(lengths, seed=10)
    probe = LengthProbe(model)
    try:
        with strategy(model):
            out = generate(model, ids, mask, max_new_tokens=12)
    finally:
        probe.remove()
    if ratio == 0:
        assert strategy.is_noop
        plain = generate(model, ids, mask, max_new_tokens=12)
        assert torch.equal(out.sequences, plain.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.logits, plain.logits, strict=True))
        return
    assert max(max(lengths) for lengths in probe.after_calls) < max_entries
