"""Qwen multimodal RoPE across calls: ``rope_deltas`` is model state, continuations, manual decoding.

transformers keeps each prompt's rope delta on the model (``model.model.rope_deltas``) and adds
it to the text positions while decoding. A compressed cache must continue at its own prompt's
positions: correct against the masked reference when called the way transformers expects,
and a clear error (never a silently wrong answer) otherwise.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from kvpress_mm import Compressor
from kvpress_mm.errors import InvalidInputError
from tests.helpers.masked_reference import (
    PlanRecorder,
    cache_of,
    compressed_visibility,
    decode_step_logits,
    masked_logits,
    plain_visibility,
)
from tests.helpers.tiny_qwen_vlms import (
    KINDS,
    LAYOUTS,
    TEXT_IDS,
    batch,
    build,
    generate,
    media,
    prompt,
    real_length,
    reference_inputs,
)

ATOL = 1e-4
TEETH = 1e-3
FIRST, EXTRA, SECOND = 3, 3, 3


@functools.cache
def _model(kind: str, impl: str = "sdpa") -> torch.nn.Module:
    return build(kind, impl, seed=10 + KINDS.index(kind))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _reference(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    seq: torch.Tensor,
    plans: dict[int, Any],
    calls: list[int],
    decode_plans: bool,
    unmasked: bool = False,
) -> torch.Tensor:
    """``[B, T, V]`` logits of the masked full forward over ``seq`` (the model derives its M-RoPE positions)."""
    width = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(seq.shape[0], seq.shape[1] - width, dtype=torch.long)], 1)
    visibility = {layer: compressed_visibility(p, mask, width, calls, decode_plans) for layer, p in plans.items()}
    if unmasked:  # nothing evicted (teeth)
        visibility = dict.fromkeys(visibility, plain_visibility(mask))
    extra = reference_inputs(inputs, seq.shape[1])
    return masked_logits(model, seq, mask, visibility, extra_inputs=extra, explicit_positions=False)


def _snapkv() -> Compressor:
    return Compressor.from_name("snapkv", compression_ratio=0.5, window_size=4)


# -- rope_deltas is model state: several prompts under one session --------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_prompts_in_sequence_under_one_session_each_match_their_reference(kind: str, impl: str) -> None:
    model = _model(kind, impl)
    layouts = ["three-images", "one-image", "no-image", "three-images"]
    prompts = [prompt(model, LAYOUTS[name], seed=20 + i) for i, name in enumerate(layouts)]
    recorder = PlanRecorder()
    outputs, deltas = [], []
    with recorder.recording(), Compressor.from_name("h2o", compression_ratio=0.5)(model):
        for inputs in prompts:
            outputs.append(generate(model, inputs, max_new_tokens=4))
            deltas.append(int(model.model.rope_deltas))
    assert len(set(deltas)) == 3, f"the prompts must have different rope deltas, got {deltas}"
    for inputs, out in zip(prompts, outputs):
        plans = recorder.per_layer(cache_of(out))
        width = inputs["input_ids"].shape[1]
        reference = _reference(model, inputs, out.sequences[:, :-1], plans, [1] * 3, decode_plans=True)
        assert _max_diff(torch.stack(out.logits), decode_step_logits(reference, width, 4)) < ATOL


# -- continuing a compressed cache -----------------------------------------------------------------


def _first_turn(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[Any, Any]:
    out = generate(model, inputs, max_new_tokens=FIRST)
    assert bool((model.model.rope_deltas != 0).all()), "the prompts have images: M-RoPE positions differ from text"
    return out, cache_of(out)


def _second_turn_inputs(inputs: dict[str, Any], first: Any, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens the cache has not seen (last generated + new text) and the whole conversation's mask."""
    b = first.sequences.shape[0]
    extra = torch.randint(*TEXT_IDS, (b, EXTRA), generator=torch.Generator().manual_seed(seed))
    new_ids = torch.cat([first.sequences[:, -1:], extra], dim=1)
    history_mask = torch.cat([inputs["attention_mask"], torch.ones(b, FIRST + EXTRA, dtype=torch.long)], dim=1)
    return new_ids, history_mask


@pytest.mark.parametrize("with_types", [False, True], ids=["no-mm-types", "mm-types-of-new-tokens"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "padded-batch"])
@pytest.mark.parametrize(("name", "decode_plans"), [("snapkv", False), ("h2o", True)])
@pytest.mark.parametrize("kind", KINDS)
def test_second_generate_continues_at_the_prompts_mrope_positions(
    kind: str, name: str, decode_plans: bool, batched: bool, with_types: bool
) -> None:
    model = _model(kind)
    if batched:
        inputs = batch([prompt(model, LAYOUTS["three-images"], seed=1), prompt(model, LAYOUTS["one-image"], seed=2)])
    else:
        inputs = prompt(model, LAYOUTS["three-images"], seed=1)
    width = inputs["input_ids"].shape[1]
    compressor = Compressor.from_name(name, compression_ratio=0.5, window_size=4)
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model):
        first, cache = _first_turn(model, inputs)
        new_ids, history_mask = _second_turn_inputs(inputs, first)
        kwargs: dict[str, Any] = {"mm_token_type_ids": torch.zeros_like(new_ids)} if with_types else {}
        second = generate(model, {"input_ids": new_ids, "attention_mask": history_mask}, cache=cache, **kwargs)
    plans = recorder.per_layer(cache)
    steps = second.sequences.shape[1] - new_ids.shape[1]
    seq = torch.cat([first.sequences, new_ids[:, 1:], second.sequences[:, new_ids.shape[1] : -1]], dim=1)
    calls = [1] * (FIRST - 1) + [1 + EXTRA] + [1] * (steps - 1)
    reference = _reference(model, inputs, seq, plans, calls, decode_plans)
    start = width + FIRST + EXTRA  # the second generate's first token comes from column start - 1
    got = torch.stack(second.logits)
    assert _max_diff(got, reference[:, start - 1 : start - 1 + steps].transpose(0, 1)) < ATOL
    unmasked = _reference(model, inputs, seq, plans, calls, decode_plans, unmasked=True)
    assert _max_diff(got, unmasked[:, start - 1 : start - 1 + steps].transpose(0, 1)) > TEETH


@pytest.mark.parametrize("kind", KINDS)
def test_continuation_after_another_prompt_raises_then_works_once_restored(kind: str) -> None:
    """Another prompt between the two turns leaves a stale model.model.rope_deltas: refused, with the fix."""
    model = _model(kind)
    inputs = prompt(model, LAYOUTS["three-images"], seed=3)
    other = prompt(model, LAYOUTS["one-image"], seed=4)
    width = inputs["input_ids"].shape[1]
    recorder = PlanRecorder()
    with recorder.recording(), _snapkv()(model):
        first, cache = _first_turn(model, inputs)
        delta = model.model.rope_deltas.clone()
        generate(model, other, max_new_tokens=2)  # a different prompt: different rope delta
        assert not torch.equal(model.model.rope_deltas, delta)
        new_ids, history_mask = _second_turn_inputs(inputs, first)
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        with pytest.raises(InvalidInputError, match=r"rope_deltas") as info:
            generate(model, {"input_ids": new_ids, "attention_mask": history_mask}, cache=cache)
        assert f"torch.tensor({delta.flatten().tolist()})" in str(info.value)
        assert [layer.keys.shape[-2] for layer in cache.layers] == lengths, "the refused call left the cache alone"
        model.model.rope_deltas = delta  # the fix the message gives
        second = generate(model, {"input_ids": new_ids, "attention_mask": history_mask}, cache=cache)
    plans = recorder.per_layer(cache)
    steps = second.sequences.shape[1] - new_ids.shape[1]
    seq = torch.cat([first.sequences, new_ids[:, 1:], second.sequences[:, new_ids.shape[1] : -1]], dim=1)
    reference = _reference(model, inputs, seq, plans, [1] * (FIRST - 1) + [1 + EXTRA] + [1] * (steps - 1), False)
    start = width + FIRST + EXTRA
    got = torch.stack(second.logits)
    assert _max_diff(got, reference[:, start - 1 : start - 1 + steps].transpose(0, 1)) < ATOL

    # teeth: without kvpress-mm's check, transformers continues with the stale delta and gets another answer
    first_plain = generate(model, inputs, max_new_tokens=FIRST)
    right = generate(model, {"input_ids": new_ids, "attention_mask": history_mask}, cache=cache_of(first_plain))
    first_plain = generate(model, inputs, max_new_tokens=FIRST)
    generate(model, other, max_new_tokens=2)
    stale = generate(model, {"input_ids": new_ids, "attention_mask": history_mask}, cache=cache_of(first_plain))
    assert _max_diff(torch.stack(right.logits), torch.stack(stale.logits)) > TEETH


@pytest.mark.parametrize("kind", KINDS)
def test_continuation_with_whole_conversation_mm_token_type_ids_raises(kind: str) -> None:
    model = _model(kind)
    inputs = prompt(model, LAYOUTS["three-images"], seed=5)
    with _snapkv()(model):
        first, cache = _first_turn(model, inputs)
        new_ids, history_mask = _second_turn_inputs(inputs, first)
        whole = reference_inputs(inputs, history_mask.shape[1])["mm_token_type_ids"]
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        with pytest.raises(InvalidInputError, match="mm_token_type_ids only for the new tokens"):
            second_inputs = {"input_ids": new_ids, "attention_mask": history_mask, "mm_token_type_ids": whole}
            generate(model, second_inputs, cache=cache)
        # ... also with the grids again: transformers would then recompute positions from the mismatched inputs
        with pytest.raises(InvalidInputError, match="mm_token_type_ids only for the new tokens"):
            grids = {k: v for k, v in inputs.items() if k.endswith("grid_thw")}
            generate(model, {**second_inputs, **grids}, cache=cache)
        assert [layer.keys.shape[-2] for layer in cache.layers] == lengths


@pytest.mark.parametrize("kind", KINDS)
def test_continuation_with_new_images_raises(kind: str) -> None:
    model = _model(kind)
    inputs = prompt(model, LAYOUTS["one-image"], seed=6)
    with _snapkv()(model):
        first, cache = _first_turn(model, inputs)
        image = prompt(model, [2, ("image", (2, 4))], seed=7)
        new_ids = torch.cat([first.sequences[:, -1:], image["input_ids"][:, 1:]], dim=1)
        types = torch.cat([torch.zeros(1, 1, dtype=torch.long), image["mm_token_type_ids"][:, 1:]], dim=1)
        history_mask = torch.ones(1, inputs["input_ids"].shape[1] + FIRST - 1 + new_ids.shape[1], dtype=torch.long)
        second = {"input_ids": new_ids, "attention_mask": history_mask, "mm_token_type_ids": types, **media(image)}
        with pytest.raises(InvalidInputError, match="new images"):
            generate(model, second, cache=cache)
        with pytest.raises(InvalidInputError, match="new images"), torch.no_grad():
            model(**second, cache=cache)


# -- manual decoding on a compressed cache -----------------------------------------------------------


@pytest.mark.parametrize("prefill", ["generate", "forward"])
@pytest.mark.parametrize("kind", KINDS)
def test_manual_decode_needs_mrope_positions(kind: str, prefill: str) -> None:
    """A hand-written decode step: [4, B, 1] / [3, B, 1] positions with the delta work; others raise."""
    model = _model(kind)
    inputs = prompt(model, LAYOUTS["three-images"], seed=8)
    (length,) = real_length(inputs)
    with _snapkv()(model):
        reference = generate(model, inputs, max_new_tokens=2)  # the second step is what the manual step must give
    token = reference.sequences[:, -2:-1]
    with _snapkv()(model), torch.no_grad():
        if prefill == "generate":
            cache = cache_of(generate(model, inputs, max_new_tokens=1))
            assert torch.equal(token, reference.sequences[:, length : length + 1])
        else:
            out = model(**inputs, use_cache=True)
            cache = out.cache
            assert torch.equal(out.logits[:, -1].argmax(-1, keepdim=True), token)
        delta = int(model.model.rope_deltas)
        assert delta < 0
        mask = torch.ones(1, length + 1, dtype=torch.long)
        text = torch.tensor([[[length]]])
        with pytest.raises(InvalidInputError, match="explicit position_ids"):
            model(input_ids=token, cache=cache, attention_mask=mask)
        with pytest.raises(InvalidInputError, match="2-D position_ids"):
            model(input_ids=token, cache=cache, position_ids=text[0] + delta)
        with pytest.raises(InvalidInputError, match="rope delta"):
            model(input_ids=token, cache=cache, position_ids=text.expand(4, 1, 1))  # the delta forgotten
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        assert lengths == [cache.layers[0].keys.shape[-2]] * len(lengths)
        four_rows = torch.cat([text, (text + delta).expand(3, 1, 1)])
        logits = model(input_ids=token, cache=cache, position_ids=four_rows).logits[:, -1]
    assert _max_diff(logits, reference.logits[1]) < 1e-5
    with _snapkv()(model), torch.no_grad():
        cache = cache_of(generate(model, inputs, max_new_tokens=1))
        three_rows = (text + delta).expand(3, 1, 1)
        logits = model(input_ids=token, cache=cache, attention_mask=mask, position_ids=three_rows).logits[:, -1]
    assert _max_diff(logits, reference.logits[1]) < 1e-5
