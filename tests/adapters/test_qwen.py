"""End-to-end compression of tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models.

Every built-in strategy generates with the budget it promises; eviction-only strategies decode
exactly what a full no-cache forward computes with the evicted entries hidden, the model
deriving its own multimodal RoPE (M-RoPE) positions for that forward, so the positions used
after compression are the ones the model uses without it. Also: LOOK-M's text prior on real
image spans, and left-padded batches of prompts with different numbers of images.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from kvpress_mm import Compressor
from kvpress_mm.modality import Modality
from kvpress_mm.strategies import BUILTIN_STRATEGIES
from tests.helpers.budgets import assert_layer_budgets
from tests.helpers.masked_reference import (
    PlanRecorder,
    cache_of,
    compressed_visibility,
    decode_step_logits,
    kept_prompt_columns,
    masked_logits,
    plain_visibility,
)
from tests.helpers.tiny_qwen_vlms import KINDS, LAYOUTS, batch, build, generate, prompt, real_length, reference_inputs

ATOL = 1e-4
TEETH = 1e-3  # a reference that is wrong must be at least this far from the compressed run
NEW_TOKENS = 4
EVICTION_ONLY = {"random", "streaming", "h2o", "snapkv", "lookm-evict", "tova", "knorm", "vl-cache"}
IMPLS = ["sdpa", "eager"]
RATIOS = [0.5, 0.9]
LAYOUT_NAMES = list(LAYOUTS)  # one image, three of different sizes, none, a video


@functools.cache
def _model(kind: str, impl: str) -> torch.nn.Module:
    # shared between tests: a session leaves the model exactly as found (test_vlm_qwen_inputs checks it)
    return build(kind, impl, seed=KINDS.index(kind))


def _layout(name: str, impl: str, ratio: float) -> str:
    # every (kind, impl, ratio) sees every layout across the nine strategies
    return LAYOUT_NAMES[(BUILTIN_STRATEGIES.index(name) + IMPLS.index(impl) + RATIOS.index(ratio)) % len(LAYOUT_NAMES)]


def _run(
    model: torch.nn.Module, compressor: Compressor, inputs: dict[str, Any], **kwargs: Any
) -> tuple[Any, dict[int, Any], Any]:
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model) as session:
        out = generate(model, inputs, max_new_tokens=NEW_TOKENS, **kwargs)
    return out, recorder.per_layer(cache_of(out)), session.report


def _reference(
    model: torch.nn.Module, inputs: dict[str, Any], out: Any, plans: dict[int, Any], decode_plans: bool, **extra: Any
) -> torch.Tensor:
    """``[steps, B, V]`` decode logits of the masked no-cache forward (the model computes its M-RoPE positions)."""
    width = inputs["input_ids"].shape[1]
    seq = out.sequences[:, :-1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(seq.shape[0], seq.shape[1] - width, dtype=torch.long)], 1)
    calls = [1] * (NEW_TOKENS - 1)
    visibility = {layer: compressed_visibility(p, mask, width, calls, decode_plans) for layer, p in plans.items()}
    visibility.update(extra.pop("visibility", {}))
    extra_inputs = {**reference_inputs(inputs, seq.shape[1]), **extra}
    logits = masked_logits(model, seq, mask, visibility, extra_inputs=extra_inputs, explicit_positions=False)
    return decode_step_logits(logits, width, NEW_TOKENS)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", BUILTIN_STRATEGIES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_generate_keeps_n_keep_and_matches_masked_reference(kind: str, impl: str, name: str, ratio: float) -> None:
    model = _model(kind, impl)
    layout = _layout(name, impl, ratio)
    inputs = prompt(model, LAYOUTS[layout], seed=BUILTIN_STRATEGIES.index(name))
    (length,) = real_length(inputs)
    compressor = Compressor.from_name(name, compression_ratio=ratio)
    out, plans, report = _run(model, compressor, inputs)
    rope_deltas = model.model.rope_deltas.flatten().tolist()
    assert (rope_deltas == [0]) == (layout == "no-image"), "images shift the M-RoPE positions of the text after them"

    n_keep = length if name == "full" else max(1, int(length * (1 - ratio)))  # literally, as the spec says
    decode_evicts = name == "h2o"  # decode_eviction defaults to True
    cache = cache_of(out)
    assert out.sequences.shape == (1, length + NEW_TOKENS)
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert report.prompt_lengths == (length,)
    if name == "full":
        assert plans == {} and report.layers_compressed == 0
    else:
        assert sorted(plans) == list(range(len(cache.layers))), "every layer is compressed"
        assert report.n_keep == (n_keep,) and report.layers_compressed == len(cache.layers)
        assert_layer_budgets(name, [p[0].length_after for p in plans.values()], n_keep, length)
        for layer_plans in plans.values():
            assert layer_plans[0].length_before == length
            assert len(layer_plans) == (NEW_TOKENS if decode_evicts else 1)
            for step in layer_plans[1:]:  # h2o stays at n_keep while decoding
                assert (step.length_before, step.length_after) == (n_keep + 1, n_keep)
    kept = [plans[i][0].length_after if plans else n_keep for i in range(len(cache.layers))]
    final = [k if decode_evicts else k + NEW_TOKENS - 1 for k in kept]
    assert [layer.keys.shape[-2] for layer in cache.layers] == final
    assert [layer.values.shape[-2] for layer in cache.layers] == final

    if name in EVICTION_ONLY:
        reference = _reference(model, inputs, out, plans, decode_plans=decode_evicts)
        assert (torch.stack(out.logits) - reference).abs().max().item() < ATOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_comparison_has_teeth(kind: str, impl: str) -> None:
    """The reference above is sharp: unmasked, or decoding without the rope delta, is visibly different."""
    model = _model(kind, impl)
    inputs = prompt(model, LAYOUTS["three-images"], seed=3)
    (length,) = real_length(inputs)
    out, plans, _ = _run(model, Compressor.from_name("snapkv", compression_ratio=0.5, window_size=4), inputs)
    got = torch.stack(out.logits)
    assert (got - _reference(model, inputs, out, plans, False)).abs().max().item() < ATOL

    seq = out.sequences[:, :-1]
    mask = torch.ones_like(seq)
    types = reference_inputs(inputs, seq.shape[1])["mm_token_type_ids"]
    grids = {k: v for k, v in inputs.items() if k.endswith("grid_thw")}
    positions, deltas = model.model.get_rope_index(seq, mm_token_type_ids=types, attention_mask=mask, **grids)
    assert int(deltas) < 0
    text = torch.arange(seq.shape[1])[None, None]
    explicit = torch.cat([text, positions])  # [4, 1, T]: what the model derives itself
    assert (got - _reference(model, inputs, out, plans, False, position_ids=explicit)).abs().max().item() < ATOL
    # decode steps at the text positions (rope delta forgotten): a different answer
    no_delta = explicit.clone()
    no_delta[1:, :, length:] = text[..., length:]
    forgot_delta = _reference(model, inputs, out, plans, False, position_ids=no_delta)
    assert (got[1:] - forgot_delta[1:]).abs().max().item() > TEETH
    # nothing hidden: a different answer
    unmasked = {layer: plain_visibility(mask) for layer in plans}
    assert (got[1:] - _reference(model, inputs, out, plans, False, visibility=unmasked)[1:]).abs().max() > TEETH


# -- LOOK-M's text prior on real image spans ------------------------------------------------------

WINDOW = 4


@torch.no_grad()
def _accumulated_attention(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[int, torch.Tensor]:
    """Per layer ``[kv_heads, L]``: column sums of the eager attention probabilities, averaged over a KV group."""
    attentions = model(**inputs, output_attentions=True, use_cache=False).attentions
    kv_heads = model.config.text_config.num_key_value_heads
    scores = {}
    for layer, probs in enumerate(attentions):  # [1, H, L, L]
        per_head = probs[0].float().sum(dim=1)  # [H, L]
        scores[layer] = per_head.reshape(kv_heads, -1, per_head.shape[-1]).mean(1)
    return scores


@pytest.mark.parametrize("name", ["lookm-evict", "lookm-pivotal"])
@pytest.mark.parametrize("kind", KINDS)
def test_lookm_text_prior_on_image_spans(kind: str, name: str) -> None:
    model = _model(kind, "eager")
    inputs = prompt(model, LAYOUTS["three-images"], seed=5)
    (length,) = real_length(inputs)
    modality = torch.zeros(length, dtype=torch.long)
    modality[inputs["mm_token_type_ids"][0] == 1] = int(Modality.IMAGE)
    outside = length - WINDOW
    is_text = modality[:outside] == Modality.TEXT
    n_text = int(is_text.sum())
    assert 0 < n_text < outside and bool((modality[outside:] == Modality.TEXT).all())
    scores = _accumulated_attention(model, inputs)

    small, large = 0.5, 0.2
    assert int(length * (1 - small)) - WINDOW < n_text < int(length * (1 - large)) - WINDOW
    for ratio in (small, large):
        n_keep = int(length * (1 - ratio))
        budget = n_keep - WINDOW
        _, plans, _ = _run(model, Compressor.from_name(name, compression_ratio=ratio, window_size=WINDOW), inputs)
        for layer, layer_plans in plans.items():
            for head, kept in enumerate(kept_prompt_columns(layer_plans)[0]):
                kept_set = set(kept.tolist())
                assert set(range(outside, length)) <= kept_set, "the window is kept"
                head_scores = scores[layer][head, :outside]
                kept_outside = torch.tensor(sorted(k for k in kept_set if k < outside))
                if budget < n_text:
                    # no image entry outside the window survives; the best-scoring text does
                    assert bool((modality[kept_outside] == Modality.TEXT).all())
                    text_scores = head_scores.masked_fill(~is_text, float("-inf"))
                    expected = set(text_scores.topk(budget).indices.tolist())
                else:
                    # all text survives; the rest of the budget goes to the best-scoring image entries
                    image_scores = head_scores.masked_fill(is_text, float("-inf"))
                    best_images = image_scores.topk(budget - n_text).indices.tolist()
                    expected = set(is_text.nonzero().flatten().tolist()) | set(best_images)
                assert set(kept_outside.tolist()) == expected, (layer, head, ratio)
    # teeth: with this prompt, plain accumulated attention (h2o, no prior) keeps image entries in the small budget
    _, plans, _ = _run(model, Compressor.from_name("h2o", compression_ratio=small, window_size=WINDOW), inputs)
    kept_images = [
        int((modality[cols[cols < outside]] != Modality.TEXT).sum())
        for layer_plans in plans.values()
        for cols in kept_prompt_columns(layer_plans)[0]
    ]
    assert sum(kept_images) > 0


# -- left-padded batches -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_STRATEGIES)
@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_rows_equal_single_prompts(kind: str, name: str) -> None:
    impl = IMPLS[(KINDS.index(kind) + BUILTIN_STRATEGIES.index(name)) % 2]
    model = _model(kind, impl)
    singles = [prompt(model, LAYOUTS["three-images"], seed=7), prompt(model, LAYOUTS["one-image"], seed=8)]
    inputs = batch(singles)
    width = inputs["input_ids"].shape[1]
    lengths = [real_length(p)[0] for p in singles]
    assert lengths[0] != lengths[1] and inputs["mm_token_type_ids"][1, : width - lengths[1]].eq(0).all()
    compressor = Compressor.from_name(name, compression_ratio=0.6)
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model) as session:
        batched = generate(model, inputs, max_new_tokens=NEW_TOKENS)
        assert session.report.prompt_lengths == tuple(lengths)
        alone = [generate(model, p, max_new_tokens=NEW_TOKENS) for p in singles]
    logits = torch.stack(batched.logits)  # [steps, B, V]
    for row, single in enumerate(alone):
        assert torch.equal(batched.sequences[row, width:], single.sequences[0, -NEW_TOKENS:])
        assert (logits[:, row] - torch.stack(single.logits)[:, 0]).abs().max().item() < ATOL
    if name != "full":
        real = inputs["attention_mask"].bool()
        kept = []
        for layer_plans in recorder.per_layer(cache_of(batched)).values():
            prefill = layer_plans[0]
            kept_real = real.gather(1, prefill.kept_indices.flatten(1)).view_as(prefill.kept_indices)
            assert kept_real[prefill.slot_valid[:, None, :].expand_as(kept_real)].all(), "padding is never kept"
            kept.append(prefill.slot_valid.sum(-1).tolist())
        for row, length in enumerate(lengths):
            assert_layer_budgets(name, [k[row] for k in kept], int(length * (1 - 0.6)), length)
        # teeth: compression changed the answer
        plain = generate(model, inputs, max_new_tokens=NEW_TOKENS)
        assert (logits[1:] - torch.stack(plain.logits)[1:]).abs().max().item() > TEETH
