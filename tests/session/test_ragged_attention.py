"""Ragged layers in generation: KV heads of different lengths, attended head by head, exactly.

A test-only strategy (``tests/helpers/ragged_strategy.py``) makes the heads of every row keep
different numbers of entries. The decode logits must equal the per-KV-head masked no-cache
reference (``masked_reference.py``), on every text family, on LLaVA and Qwen2-VL, with sdpa and
eager, in left-padded batches, when a second generate continues the cache with several tokens,
and under beam search; the stored bytes are the heads' real lengths; a ragged cache used where
it cannot be read raises a clear error.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import tests.helpers.tiny_qwen_vlms as qwen
from kvpress_mm import Compressor
from kvpress_mm.cache.ragged import RaggedLayer
from kvpress_mm.errors import UnsupportedCacheError, UnsupportedModelError
from tests.helpers.beams import assert_beams_rescored_by_forcing
from tests.helpers.masked_reference import (
    PlanRecorder,
    cache_of,
    compressed_visibility,
    decode_step_logits,
    kept_prompt_columns,
    masked_logits,
    plain_logits,
    plain_visibility,
)
from tests.helpers.ragged_strategy import SkewedHeads
from tests.helpers.tiny_models import (
    FAMILIES,
    assert_same_model_state,
    build,
    generate,
    hook_count,
    left_padded,
    model_snapshot,
    prompt,
)
from tests.helpers.tiny_vlms import build_vlm, generate_vlm, make_prompt

ATOL = 1e-4
TEETH = 1e-3
RATIO = 0.6
NEW_TOKENS = 5
IMPLS = ["sdpa", "eager"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _skewed(**config: Any) -> SkewedHeads:
    return SkewedHeads(compression_ratio=RATIO, **config)


def _visibility(
    plans: dict[int, list[Any]], mask: torch.Tensor, width: int, calls: list[int]
) -> dict[int, torch.Tensor]:
    return {layer: compressed_visibility(p, mask, width, calls, decode_plans=False) for layer, p in plans.items()}


def _assert_ragged(cache: Any, plans: dict[int, list[Any]]) -> None:
    """Every layer is ragged, and heads of a row really keep different counts (else the test proves little)."""
    assert all(isinstance(layer, RaggedLayer) for layer in cache.layers)
    kept = [kept_prompt_columns(p) for p in plans.values()]
    assert any(len({cols.numel() for cols in row}) > 1 for layer in kept for row in layer)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_ragged_decoding_equals_the_per_head_masked_reference(family: str, impl: str) -> None:
    model = build(family, impl, seed=FAMILIES.index(family))
    ids = prompt(30, seed=7)
    mask = torch.ones_like(ids)
    recorder = PlanRecorder()
    with recorder.recording(), _skewed()(model) as session:
        out = generate(model, ids, mask, max_new_tokens=NEW_TOKENS)
    cache = cache_of(out)
    plans = recorder.per_layer(cache)
    _assert_ragged(cache, plans)
    # one row: the heads of a layer hold exactly kv_heads * n_keep prompt entries, and that is what is stored
    n_keep, heads, dim = 12, 2, 16
    assert session.report.n_keep == (n_keep,)
    assert session.report.kv_bytes_after == len(cache.layers) * 2 * heads * n_keep * dim * 4
    assert all(sum(layer.head_lengths) == heads * (n_keep + NEW_TOKENS - 1) for layer in cache.layers)

    seq = out.sequences[:, :-1]
    full_mask = torch.ones_like(seq)
    visibility = _visibility(plans, full_mask, 30, [1] * (NEW_TOKENS - 1))
    reference = decode_step_logits(masked_logits(model, seq, full_mask, visibility), 30, NEW_TOKENS)
    got = torch.stack(out.logits)
    assert _max_diff(got, reference) < ATOL
    unmasked = decode_step_logits(plain_logits(model, seq, full_mask), 30, NEW_TOKENS)
    assert _max_diff(got[1:], unmasked[1:]) > TEETH
    # hiding head 0's entries from every head is not the same either: the heads really differ
    shared = {layer: vis[:, :1].expand_as(vis) for layer, vis in visibility.items()}
    shared_reference = decode_step_logits(masked_logits(model, seq, full_mask, shared), 30, NEW_TOKENS)
    assert _max_diff(got[1:], shared_reference[1:]) > TEETH


@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_left_padded_batch_equals_the_masked_reference(impl: str) -> None:
    """Rows of different lengths and budgets: every head has filler slots in some row."""
    model = build("qwen2", impl, seed=1)
    ids, mask, _ = left_padded([21, 34, 27], seed=2)
    width = ids.shape[1]
    recorder = PlanRecorder()
    with recorder.recording(), _skewed(skew=4)(model) as session:
        out = generate(model, ids, mask, max_new_tokens=NEW_TOKENS)
    cache = cache_of(out)
    plans = recorder.per_layer(cache)
    _assert_ragged(cache, plans)
    assert any(layer.head(h).valid is not None for layer in cache.layers for h in range(2))
    # stored: each head's longest row (plus the decoded entries), nothing more
    lengths = [
        max(int(cols.numel()) for cols in (row[h] for row in kept_prompt_columns(p)))
        for p in plans.values()
        for h in range(2)
    ]
    assert session.report.kv_bytes_after == sum(lengths) * 3 * 16 * 4 * 2
    seq = out.sequences[:, :-1]
    full_mask = torch.cat([mask, torch.ones(3, NEW_TOKENS - 1, dtype=mask.dtype)], dim=1)
    visibility = _visibility(plans, full_mask, width, [1] * (NEW_TOKENS - 1))
    reference = decode_step_logits(masked_logits(model, seq, full_mask, visibility), width, NEW_TOKENS)
    got = torch.stack(out.logits)
    assert _max_diff(got, reference) < ATOL
    unmasked = decode_step_logits(plain_logits(model, seq, full_mask), width, NEW_TOKENS)
    assert _max_diff(got[1:], unmasked[1:]) > TEETH


FIRST, EXTRA, SECOND = 4, 3, 4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batched", [False, True], ids=["single", "padded-batch"])
def test_second_generate_continues_a_ragged_cache(batched: bool, impl: str) -> None:
    """Several new tokens at once (a question after the compressed prompt): causal within the call, per head."""
    model = build("qwen3", impl, seed=3)
    if batched:
        ids, mask, _ = left_padded([24, 31], seed=4)
    else:
        ids = prompt(30, seed=4)
        mask = torch.ones_like(ids)
    b, width = ids.shape
    extra = torch.randint(3, 256, (b, EXTRA), generator=torch.Generator().manual_seed(5))
    recorder = PlanRecorder()
    with recorder.recording(), _skewed()(model):
        first = generate(model, ids, mask, max_new_tokens=FIRST)
        cache = cache_of(first)
        new_ids = torch.cat([first.sequences[:, -1:], extra], dim=1)
        history_mask = torch.cat([mask, torch.ones(b, FIRST + EXTRA, dtype=mask.dtype)], dim=1)
        second = generate(model, new_ids, history_mask, max_new_tokens=SECOND, cache=cache)
    plans = recorder.per_layer(cache)
    _assert_ragged(cache, plans)
    seq = torch.cat([first.sequences, extra, second.sequences[:, -SECOND:-1]], dim=1)
    full_mask = torch.cat([mask, torch.ones(b, seq.shape[1] - width, dtype=mask.dtype)], dim=1)
    calls = [1] * (FIRST - 1) + [1 + EXTRA] + [1] * (SECOND - 1)
    visibility = _visibility(plans, full_mask, width, calls)
    start = width + FIRST + EXTRA
    reference = masked_logits(model, seq, full_mask, visibility)[:, start - 1 : start - 1 + SECOND].transpose(0, 1)
    got = torch.stack(second.logits)
    assert _max_diff(got, reference) < ATOL
    unmasked = plain_logits(model, seq, full_mask)[:, start - 1 : start - 1 + SECOND].transpose(0, 1)
    assert _max_diff(got, unmasked) > TEETH


@pytest.mark.parametrize("impl", IMPLS)
def test_left_padded_new_tokens_on_a_ragged_cache(impl: str) -> None:
    """A second turn whose rows bring different numbers of tokens, left-padded within the call.

    Some heads keep no entry of a row at all: the row's padding queries would see nothing there.
    """
    model = build("llama", impl, seed=5)
    ids, mask, _ = left_padded([22, 28], seed=6)
    b, width = ids.shape
    extra = torch.randint(3, 256, (b, EXTRA), generator=torch.Generator().manual_seed(8))
    recorder = PlanRecorder()
    with recorder.recording(), _skewed(skew=100, allow_empty=True)(model):
        first = generate(model, ids, mask, max_new_tokens=1)  # the cache: the compressed prompt only
        cache = cache_of(first)
        last = first.sequences[:, -1]
        # row 0: its last token and 3 new ones; row 1: two padding tokens, its last token and 1 new one
        new_ids = torch.stack([torch.cat([last[:1], extra[0]]), torch.tensor([0, 0, int(last[1]), int(extra[1, 0])])])
        new_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]], dtype=mask.dtype)
        history_mask = torch.cat([mask, new_mask], dim=1)
        second = generate(model, new_ids, history_mask, max_new_tokens=SECOND, cache=cache)
    plans = recorder.per_layer(cache)
    _assert_ragged(cache, plans)
    assert any(cols.numel() == 0 for p in plans.values() for cols in kept_prompt_columns(p)[1])
    assert all(torch.isfinite(step).all() for step in second.logits)
    seq = torch.cat([first.sequences[:, :-1], new_ids, second.sequences[:, -SECOND:-1]], dim=1)
    full_mask = torch.cat([history_mask, torch.ones(b, SECOND - 1, dtype=mask.dtype)], dim=1)
    calls = [1 + EXTRA] + [1] * (SECOND - 1)
    visibility = _visibility(plans, full_mask, width, calls)
    start = width + 1 + EXTRA
    reference = masked_logits(model, seq, full_mask, visibility)[:, start - 1 : start - 1 + SECOND].transpose(0, 1)
    got = torch.stack(second.logits)
    assert _max_diff(got, reference) < ATOL
    # the padding tokens matter: seeing them changes row 1's logits
    seen = full_mask.clone()
    seen[1] = 1
    leaky = _visibility(plans, seen, width, calls)
    leaky_reference = masked_logits(model, seq, full_mask, leaky)[:, start - 1 : start - 1 + SECOND].transpose(0, 1)
    assert _max_diff(got[:, 1], leaky_reference[:, 1]) > TEETH


def test_no_query_of_a_ragged_head_sees_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A padding query whose head holds no real entry of its row sees itself (some kernels give NaN otherwise)."""
    import kvpress_mm.session.attention as attention_module

    masks: list[torch.Tensor] = []
    original_attention = attention_module.original_attention

    def recording(module: torch.nn.Module, wrapped: str) -> Any:
        original = original_attention(module, wrapped)

        def attention(module: Any, query: Any, key: Any, value: Any, mask: Any, **kwargs: Any) -> Any:
            if isinstance(mask, torch.Tensor):
                masks.append(mask)
            return original(module, query, key, value, mask, **kwargs)

        return attention

    monkeypatch.setattr(attention_module, "original_attention", recording)
    model = build("llama", "sdpa", seed=5)
    ids, mask, _ = left_padded([22, 28], seed=6)
    with _skewed(skew=100, allow_empty=True)(model):
        first = generate(model, ids, mask, max_new_tokens=1)
        cache = cache_of(first)
        assert any(length == 0 for layer in cache.layers for length in layer.head_lengths)
        last = first.sequences[:, -1]
        new_ids = torch.tensor([[int(last[0]), 5, 6, 7], [0, 0, int(last[1]), 9]])
        history = torch.cat([mask, torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])], dim=1)
        masks.clear()
        generate(model, new_ids, history, max_new_tokens=1, cache=cache)
    assert masks and all(bool(m.any(-1).all()) for m in masks)


@pytest.mark.parametrize("impl", IMPLS)
def test_beam_search_on_a_ragged_cache_equals_teacher_forced_rescoring(impl: str) -> None:
    beams, tokens_out = 4, 12
    model = build("llama", impl)
    ids, mask, _ = left_padded([14, 20])
    compressor = _skewed(skew=2)
    options: dict[str, Any] = dict(
        num_beams=beams, num_return_sequences=beams, max_new_tokens=tokens_out, length_penalty=0.0, output_logits=False
    )
    with compressor(model):
        out = generate(model, ids, mask, **options)
    steps = out.beam_indices[:, :tokens_out]
    assert bool((steps != steps[:, -1:]).any()), "no beam changed its parent row: nothing was reordered"
    assert all(isinstance(layer, RaggedLayer) for layer in cache_of(out).layers)
    assert_beams_rescored_by_forcing(model, compressor, ids, mask, out, beams, tokens_out, ATOL)


def test_copies_of_a_ragged_cache_continue_like_the_original() -> None:
    model = build("llama", "sdpa")
    ids, mask, _ = left_padded([10, 16])
    with _skewed()(model):
        first = generate(model, ids, mask, max_new_tokens=3)
        cache = cache_of(first)
        branch = copy.deepcopy(cache)
        new_ids = first.sequences[:, -1:]
        history = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], dim=1)
        copied = generate(model, new_ids, history, max_new_tokens=3, cache=branch)
        original = generate(model, new_ids, history, max_new_tokens=3, cache=cache)
    assert torch.equal(copied.sequences, original.sequences)
    assert _max_diff(torch.stack(copied.logits), torch.stack(original.logits)) == 0.0


# -- vision-language models ---------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_llava_equals_the_masked_reference(impl: str) -> None:
    model = build_vlm("llava", impl, seed=0)
    vlm_prompt = make_prompt("llava", model, 2, seed=1)
    width = vlm_prompt.length
    recorder = PlanRecorder()
    with recorder.recording(), _skewed(skew=5)(model):
        out = generate_vlm(model, vlm_prompt.inputs(), max_new_tokens=4)
    cache = cache_of(out)
    plans = recorder.per_layer(cache)
    _assert_ragged(cache, plans)
    seq = out.sequences[:, :-1]
    full_mask = torch.ones_like(seq)
    visibility = _visibility(plans, full_mask, width, [1] * 3)
    reference = masked_logits(model, seq, full_mask, visibility, extra_inputs=vlm_prompt.pixels)
    plain = masked_logits(
        model, seq, full_mask, dict.fromkeys(visibility, plain_visibility(full_mask)), extra_inputs=vlm_prompt.pixels
    )
    got = torch.stack(out.logits)
    assert _max_diff(got, decode_step_logits(reference, width, 4)) < ATOL
    assert _max_diff(got[1:], decode_step_logits(plain, width, 4)[1:]) > TEETH


@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_qwen2_vl_batch_equals_the_masked_reference(impl: str) -> None:
    """Multimodal RoPE positions, two rows with different images (and budgets), ragged heads."""
    model = qwen.build("qwen2_vl", impl, seed=10)
    prompts = [
        qwen.prompt(model, qwen.LAYOUTS["three-images"], seed=1),
        qwen.prompt(model, qwen.LAYOUTS["one-image"], seed=2),
    ]
    inputs = qwen.batch(prompts)
    width = inputs["input_ids"].shape[1]
    recorder = PlanRecorder()
    with recorder.recording(), _skewed(skew=5)(model):
        out = qwen.generate(model, inputs, max_new_tokens=4)
    cache = cache_of(out)
    plans = recorder.per_layer(cache)
    _assert_ragged(cache, plans)
    seq = out.sequences[:, :-1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, seq.shape[1] - width, dtype=torch.long)], 1)
    visibility = _visibility(plans, mask, width, [1] * 3)
    extra = qwen.reference_inputs(inputs, seq.shape[1])
    reference = masked_logits(model, seq, mask, visibility, extra_inputs=extra, explicit_positions=False)
    plain = masked_logits(
        model,
        seq,
        mask,
        dict.fromkeys(visibility, plain_visibility(mask)),
        extra_inputs=extra,
        explicit_positions=False,
    )
    got = torch.stack(out.logits)
    assert _max_diff(got, decode_step_logits(reference, width, 4)) < ATOL
    assert _max_diff(got[1:], decode_step_logits(plain, width, 4)[1:]) > TEETH


# -- where a ragged cache cannot be read ----------------------------------------------------------


def test_a_ragged_cache_outside_the_session_raises_and_leaves_the_model_as_found() -> None:
    model = build("llama", "sdpa")
    before = model_snapshot(model)
    ids = prompt(20)
    with _skewed()(model):
        first = generate(model, ids, max_new_tokens=2)
    history = torch.ones(1, 22, dtype=torch.long)
    with pytest.raises(UnsupportedCacheError, match="ragged per-head layers"):
        generate(model, first.sequences[:, -1:], history, max_new_tokens=2, cache=cache_of(first))
    assert hook_count(model) == 0
    assert_same_model_state(before, model_snapshot(model))
    # any kvpress-mm session reads it (here a no-op one)
    with Compressor.from_name("snapkv", compression_ratio=0.0)(model):
        second = generate(model, first.sequences[:, -1:], history, max_new_tokens=2, cache=cache_of(first))
    assert second.sequences.shape == (1, 3)


def test_decode_eviction_on_a_ragged_cache_is_refused() -> None:
    """h2o evicts one entry per head and step down to a uniform budget: it cannot continue ragged heads."""
    model = build("llama", "sdpa")
    with _skewed()(model):
        first = generate(model, prompt(20), max_new_tokens=2)
    history = torch.ones(1, 22, dtype=torch.long)
    with Compressor.from_name("h2o", compression_ratio=0.5)(model):
        with pytest.raises(UnsupportedCacheError, match="decode_eviction=False"):
            generate(model, first.sequences[:, -1:], history, max_new_tokens=2, cache=cache_of(first))


def test_attention_weights_of_ragged_layers_are_refused() -> None:
    model = build("llama", "eager")
    with _skewed()(model):
        with pytest.raises(UnsupportedModelError, match="output_attentions"):
            generate(model, prompt(20), max_new_tokens=2, output_attentions=True)
