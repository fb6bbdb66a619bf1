"""Slot modality per KV head: through prefill plans, appends, decode evictions, re-plans and beam search.

The end-to-end checks identify every cached entry independently: a prompt entry's key in layer 0
is exactly the key an uncompressed prefill computed at its position (layer 0's keys depend on the
token and position only), so each slot's entry, hence its modality, is recovered by matching keys.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvpress_mm import CompressionPlan, Compressor, Modality
from kvpress_mm.session.slots import follow_plan, modality_after_plan, slot_modality
from kvpress_mm.session.state import LayerState, state_of
from tests.helpers import tiny_vlms as tv
from tests.helpers.masked_reference import cache_of

T, IMG, V, P = (int(m) for m in (Modality.TEXT, Modality.IMAGE, Modality.VIDEO, Modality.PADDING))


def test_slots_beyond_the_known_prefix_are_text_or_padding() -> None:
    known = torch.tensor([[[IMG, T], [T, IMG]]], dtype=torch.int8)  # [1, 2 heads, 2 slots]
    valid = torch.tensor([[True, True, False, True]])
    assert slot_modality(known, valid, 1, 2, 4).tolist() == [[[IMG, T, P, T], [T, IMG, P, T]]]
    assert slot_modality(None, None, 2, 1, 2).tolist() == [[[T, T]], [[T, T]]]
    assert slot_modality(known, None, 1, 2, 1).tolist() == [[[IMG], [T]]]  # a cropped layer


def test_a_plan_keeps_the_modality_of_the_entries_it_keeps() -> None:
    prompt = torch.tensor([[T, IMG, IMG, V], [P, P, T, IMG]], dtype=torch.int8)
    plan = CompressionPlan(
        kept_indices=torch.tensor([[[1, 3], [0, 2]], [[0, 3], [0, 2]]]),
        slot_valid=torch.tensor([[True, True], [False, True]]),
    )
    assert modality_after_plan(prompt, plan).tolist() == [[[IMG, V], [T, IMG]], [[P, IMG], [P, T]]]
    state = LayerState(4, None, (2, 1), {}, slot_modality=prompt[:, None, :2].expand(-1, 2, -1).contiguous())
    follow_plan(state, plan)  # chooses among the layer's own 4 slots: the last 2 appended (text)
    assert state.slot_modality is not None
    assert state.slot_modality.tolist() == [[[IMG, T], [T, T]], [[P, T], [P, T]]]


def _prompt_columns(cached: torch.Tensor, prompt: torch.Tensor, beams: int) -> torch.Tensor:
    """``[rows, kvH, n]``: the prompt column whose layer-0 key each slot holds (-1: none, a generated entry)."""
    rows, heads, n, _ = cached.shape
    columns = torch.full((rows, heads, n), -1, dtype=torch.long)
    for row in range(rows):
        for head in range(heads):
            distance = torch.cdist(cached[row, head].double(), prompt[row // beams, head].double())  # [n, L]
            best = distance.min(-1)
            matched = best.values <= 1e-5 * (1 + cached[row, head].double().norm(dim=-1))
            columns[row, head] = torch.where(matched, best.indices, -1)
    return columns


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("snapkv", {}),  # per-head prefill selection, then appends
        ("h2o", {"num_beams": 2}),  # per-step eviction, beams reordered
        ("decoding", {}),  # whole-cache re-plans
    ],
)
def test_slot_modality_is_that_of_the_entry_each_slot_holds(strategy: str, options: dict[str, Any]) -> None:
    model = tv.build_vlm("llava")
    prompts = [tv.make_prompt("llava", model, 2, seed=1), tv.make_prompt("llava", model, 1, seed=2)]
    ids, mask, pixels = tv.left_pad_batch("llava", prompts)
    inputs = {"input_ids": ids, "attention_mask": mask, **pixels}
    plain = tv.generate_vlm(model, inputs, max_new_tokens=1)
    prompt_keys = cache_of(plain).layers[0].keys  # [B, kvH, L, D]
    config: dict[str, Any] = {"compression_ratio": 0.3}
    if strategy == "decoding":
        config.update(inner={"strategy": "snapkv", "window_size": 2}, max_entries=20, interval=3)
    compressor = Compressor.from_name(strategy, **config)
    with compressor(model):
        out = tv.generate_vlm(model, inputs, max_new_tokens=8, **options)
    cache = cache_of(out)
    state = state_of(cache)
    assert state is not None
    layer_state = state.layers[0]
    keys = cache.layers[0].keys
    rows, heads, length = (int(n) for n in keys.shape[:3])
    assert layer_state.length == length
    tracked = slot_modality(layer_state.slot_modality, layer_state.slot_valid, rows, heads, length)
    columns = _prompt_columns(keys, prompt_keys, options.get("num_beams", 1))
    prompt_modality = tv_modality(ids, mask, int(model.config.image_token_id))
    beams = options.get("num_beams", 1)
    expected = torch.where(
        columns >= 0,
        prompt_modality[torch.arange(rows) // beams][:, None, :].expand(-1, heads, -1).gather(2, columns.clamp(min=0)),
        T,
    )
    valid = layer_state.cached_valid(rows, keys.device)[:, None, :].expand(-1, heads, -1)
    expected = expected.masked_fill(~valid, P).to(torch.int8)
    assert torch.equal(tracked, expected)
    assert bool((tracked == IMG).any()), "some image entries are still cached"
    assert bool((columns[valid] < 0).any()), "some generated entries are cached"


def tv_modality(ids: torch.Tensor, mask: torch.Tensor, image_id: int) -> torch.Tensor:
    modality = torch.where(ids == image_id, IMG, T)
    return modality.masked_fill(mask == 0, P)


def test_row_reorders_carry_the_slot_modality() -> None:
    """Beam search's ``reorder_cache`` on a compressed cache: each row's slot modality goes with the row."""
    model = tv.build_vlm("llava")
    prompts = [tv.make_prompt("llava", model, 2, seed=1), tv.make_prompt("llava", model, 0, seed=2)]
    ids, mask, pixels = tv.left_pad_batch("llava", prompts)
    with Compressor.from_name("snapkv", compression_ratio=0.3, window_size=2)(model):
        out = tv.generate_vlm(model, {"input_ids": ids, "attention_mask": mask, **pixels}, max_new_tokens=2)
    cache = cache_of(out)
    state = state_of(cache)
    assert state is not None
    before = [state.layers[layer].slot_modality.clone() for layer in sorted(state.layers)]  # type: ignore[union-attr]
    assert not torch.equal(before[0][0], before[0][1])
    cache.reorder_cache(torch.tensor([1, 0, 0]))
    for layer, modality in zip(sorted(state.layers), before, strict=True):
        assert torch.equal(state.layers[layer].slot_modality, modality[[1, 0, 0]])  # type: ignore[arg-type]
