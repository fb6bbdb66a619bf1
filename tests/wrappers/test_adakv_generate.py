"""``adakv`` end to end: generation on its ragged cache equals the per-KV-head masked reference.

Text LMs of every family, LLaVA and Qwen2-VL, sdpa and eager, one row and left-padded batches,
beam search; the stored bytes are the heads' real lengths (``H * n_keep`` per layer for one
row); ratio 0 leaves cache and output bit-identical to running without a compressor.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import tests.helpers.tiny_qwen_vlms as qwen
from kvpress_mm import Compressor
from kvpress_mm.cache.ragged import RaggedLayer
from tests.helpers.beams import assert_beams_rescored_by_forcing
from tests.helpers.masked_reference import (
    PlanRecorder,
    cache_of,
    compressed_visibility,
    decode_step_logits,
    kept_prompt_columns,
    masked_logits,
    plain_visibility,
)
from tests.helpers.tiny_models import FAMILIES, build, generate, left_padded, prompt
from tests.helpers.tiny_vlms import build_vlm, generate_vlm, make_prompt

ATOL = 1e-4
TEETH = 1e-3
RATIO = 0.6
NEW_TOKENS = 4
IMPLS = ["sdpa", "eager"]
# a small window: the prompts are tiny, snapkv's default (32) would cover them
INNER: dict[str, Any] = {"strategy": "snapkv", "window_size": 4}


def _adakv(**config: Any) -> Compressor:
    return Compressor.from_name("adakv", inner=config.pop("inner", INNER), compression_ratio=RATIO, **config)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _check_layers(cache: Any, plans: dict[int, list[Any]], n_keep: list[int]) -> None:
    """Each layer: one plan, the total per row exactly ``kv_heads * n_keep``; some layer really ragged."""
    ragged = 0
    for layer_idx, layer_plans in plans.items():
        assert len(layer_plans) == 1, "adakv compresses once, after the prefill"
        kept = kept_prompt_columns(layer_plans)
        for row, budget in zip(kept, n_keep, strict=True):
            assert sum(int(cols.numel()) for cols in row) == len(row) * budget
        if layer_plans[0].head_valid is not None:
            ragged += 1
            assert isinstance(cache.layers[layer_idx], RaggedLayer)
    assert ragged, "no layer's heads kept different counts: the test would not exercise ragged storage"


def _reference(model: Any, out: Any, plans: dict[int, list[Any]], mask: torch.Tensor, **extra: Any) -> tuple[Any, Any]:
    """``(masked, unmasked)`` decode-step logits of the no-cache reference forward."""
    width = mask.shape[1]
    seq = out.sequences[:, :-1]
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], seq.shape[1] - width, dtype=mask.dtype)], dim=1)
    calls = [1] * (seq.shape[1] - width)
    visibility = {
        layer: compressed_visibility(p, full_mask, width, calls, decode_plans=False) for layer, p in plans.items()
    }
    plain = dict.fromkeys(visibility, plain_visibility(full_mask))
    inputs = extra.pop("extra_inputs_for", lambda total: extra.get("extra_inputs"))(seq.shape[1])
    options = {"extra_inputs": inputs, **{k: v for k, v in extra.items() if k != "extra_inputs"}}
    steps = seq.shape[1] - width + 1
    masked = decode_step_logits(masked_logits(model, seq, full_mask, visibility, **options), width, steps)
    unmasked = decode_step_logits(masked_logits(model, seq, full_mask, plain, **options), width, steps)
    return masked, unmasked


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_text_models_equal_the_masked_reference(family: str, impl: str) -> None:
    model = build(family, impl, seed=FAMILIES.index(family))
    ids = prompt(30, seed=7)
    mask = torch.ones_like(ids)
    recorder = PlanRecorder()
    with recorder.recording(), _adakv()(model) as session:
        out = generate(model, ids, mask, max_new_tokens=NEW_TOKENS)
    cache = cache_of(out)
    plans = recorder.per_layer(cache)
    n_keep = int(30 * (1 - RATIO))
    _check_layers(cache, plans, [n_keep])
    # one row: every layer stores exactly kv_heads * n_keep prompt entries, ragged or not
    heads, dim, layers = 2, 16, len(cache.layers)
    assert session.report.kv_bytes_after == layers * 2 * heads * n_keep * dim * 4
    masked, unmasked = _reference(model, out, plans, mask)
    got = torch.stack(out.logits)
    assert _max_diff(got, masked) < ATOL
    assert _max_diff(got[1:], unmasked[1:]) > TEETH


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("inner", [INNER, "knorm", {"strategy": "h2o", "decode_eviction": False}], ids=str)
def test_padded_batches_equal_the_masked_reference(inner: Any, impl: str) -> None:
    """Rows of different lengths and budgets; h2o's inner takes the fused prefill attention."""
    model = build("mistral", impl, seed=3)
    lengths = [21, 34, 27]
    ids, mask, _ = left_padded(lengths, seed=2)
    recorder = PlanRecorder()
    with recorder.recording(), _adakv(inner=inner)(model) as session:
        out = generate(model, ids, mask, max_new_tokens=NEW_TOKENS)
    cache = cache_of(out)
    plans = recorder.per_layer(cache)
    budgets = [int(n * (1 - RATIO)) for n in lengths]
    assert session.report.n_keep == tuple(budgets)
    _check_layers(cache, plans, budgets)
    masked, unmasked = _reference(model, out, plans, mask)
    got = torch.stack(out.logits)
    assert _max_diff(got, masked) < ATOL
    assert _max_diff(got[1:], unmasked[1:]) > TEETH


@pytest.mark.parametrize("impl", IMPLS)
def test_llava_equals_the_masked_reference(impl: str) -> None:
    model = build_vlm("llava", impl, seed=0)
    vlm_prompt = make_prompt("llava", model, 2, seed=1)
    recorder = PlanRecorder()
    with recorder.recording(), _adakv()(model):
        out = generate_vlm(model, vlm_prompt.inputs(), max_new_tokens=NEW_TOKENS)
    cache = cache_of(out)
    plans = recorder.per_layer(cache)
    _check_layers(cache, plans, [int(vlm_prompt.length * (1 - RATIO))])
    mask = torch.ones(1, vlm_prompt.length, dtype=torch.long)
    masked, unmasked = _reference(model, out, plans, mask, extra_inputs=vlm_prompt.pixels)
    got = torch.stack(out.logits)
    assert _max_diff(got, masked) < ATOL
    assert _max_diff(got[1:], unmasked[1:]) > TEETH


@pytest.mark.parametrize("impl", IMPLS)
def test_qwen2_vl_batch_equals_the_masked_reference(impl: str) -> None:
    model = qwen.build("qwen2_vl", impl, seed=10)
    inputs = qwen.batch(
        [
            qwen.prompt(model, qwen.LAYOUTS["three-images"], seed=1),
            qwen.prompt(model, qwen.LAYOUTS["one-image"], seed=2),
        ]
    )
    recorder = PlanRecorder()
    with recorder.recording(), _adakv()(model):
        out = qwen.generate(model, inputs, max_new_tokens=NEW_TOKENS)
    cache = cache_of(out)
    plans = recorder.per_layer(cache)
    _check_layers(cache, plans, [int(n * (1 - RATIO)) for n in qwen.real_length(inputs)])
    masked, unmasked = _reference(
        model,
        out,
        plans,
        inputs["attention_mask"],
        extra_inputs_for=lambda total: qwen.reference_inputs(inputs, total),
        explicit_positions=False,
    )
    got = torch.stack(out.logits)
    assert _max_diff(got, masked) < ATOL
    assert _max_diff(got[1:], unmasked[1:]) > TEETH


def test_beam_search_equals_teacher_forced_rescoring() -> None:
    beams, tokens_out = 3, 10
    model = build("llama", "sdpa")
    ids, mask, _ = left_padded([24, 30])
    compressor = _adakv()
    options: dict[str, Any] = dict(
        num_beams=beams, num_return_sequences=beams, max_new_tokens=tokens_out, length_penalty=0.0, output_logits=False
    )
    with compressor(model):
        out = generate(model, ids, mask, **options)
    steps = out.beam_indices[:, :tokens_out]
    assert bool((steps != steps[:, -1:]).any()), "no beam changed its parent row: nothing was reordered"
    assert any(isinstance(layer, RaggedLayer) for layer in cache_of(out).layers)
    assert_beams_rescored_by_forcing(model, compressor, ids, mask, out, beams, tokens_out, ATOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_ratio_zero_is_bit_identical_to_no_compression(impl: str) -> None:
    model = build("qwen3", impl, seed=2)
    ids, mask, _ = left_padded([18, 25], seed=3)
    reference = generate(model, ids, mask, max_new_tokens=NEW_TOKENS)
    with Compressor.from_name("adakv", inner=INNER, compression_ratio=0.0)(model) as session:
        out = generate(model, ids, mask, max_new_tokens=NEW_TOKENS)
    assert session.report.kv_bytes_after == session.report.kv_bytes_before == 0  # nothing compressed
    assert torch.equal(out.sequences, reference.sequences)
    assert torch.equal(torch.stack(out.logits), torch.stack(reference.logits))
    for layer, ref_layer in zip(cache_of(out).layers, cache_of(reference).layers, strict=True):
        assert type(layer) is type(ref_layer)
        assert torch.equal(layer.keys, ref_layer.keys) and torch.equal(layer.values, ref_layer.values)


def test_lookm_merging_inner_generates_on_a_ragged_cache() -> None:
    """Merged entries in ragged heads: finite, the kept totals exact (merges are checked on synthetic layers)."""
    model = build_vlm("llava", "sdpa", seed=0)
    vlm_prompt = make_prompt("llava", model, 2, seed=1)
    recorder = PlanRecorder()
    with recorder.recording(), _adakv(inner={"strategy": "lookm-pivotal", "window_size": 2}, alpha=0.0)(model):
        out = generate_vlm(model, vlm_prompt.inputs(), max_new_tokens=NEW_TOKENS)
    cache = cache_of(out)
    plans = recorder.per_layer(cache)
    _check_layers(cache, plans, [int(vlm_prompt.length * (1 - RATIO))])
    assert all(p[0].merged for p in plans.values())
    assert all(torch.isfinite(step).all() for step in out.logits)
