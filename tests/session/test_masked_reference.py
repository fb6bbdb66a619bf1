"""Compressed decoding equals a full no-cache forward with the evicted entries masked per KV head.

Covers positions after eviction, per-head selections, h2o's per-step decode eviction,
continuing a compressed cache with a second ``generate``, and sliding-window layers.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from kvpress_mm import Compressor
from kvpress_mm.errors import InvalidInputError
from tests.helpers.budgets import assert_layer_budgets
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
from tests.helpers.tiny_models import FAMILIES, build, generate, left_padded, prompt

ATOL = 1e-4
# the masked reference must be far from the unmasked run, or the comparison proves nothing
TEETH = 1e-3
PROMPT_LEN = 30
NEW_TOKENS = 5
RATIO = 0.6

# (strategy, config, per-step decode plans, selections differ per KV head)
EVICTION_ONLY: list[tuple[str, dict[str, Any], bool, bool]] = [
    ("random", {}, False, True),
    ("streaming", {}, False, False),
    ("h2o", {"decode_eviction": False}, False, True),
    ("snapkv", {"window_size": 4}, False, True),
    ("lookm-evict", {}, False, True),
    ("h2o", {}, True, True),  # decode eviction: the evicted set changes at every step
    ("tova", {"head_average": "group"}, False, True),
    ("tova", {"decode_eviction": True}, True, False),  # the paper's per-step eviction, one ranking per layer
    ("knorm", {}, False, True),
    ("vl-cache", {"threshold": 0.3}, False, True),  # per-layer budgets
]


def _ids(case: tuple[str, dict[str, Any], bool, bool]) -> str:
    name, config, _, _ = case
    return name + "".join(f"-{k}={v}" for k, v in config.items())


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _run(
    model: torch.nn.Module, compressor: Compressor, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int
) -> tuple[Any, dict[int, list[Any]]]:
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model):
        out = generate(model, ids, mask, max_new_tokens=new_tokens)
    plans = recorder.per_layer(cache_of(out))
    assert sorted(plans) == list(range(len(cache_of(out).layers))), "a plan was recorded for every layer"
    return out, plans


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", EVICTION_ONLY, ids=_ids)
def test_decode_equals_per_head_masked_reference(
    case: tuple[str, dict[str, Any], bool, bool], family: str, impl: str
) -> None:
    name, config, decode_plans, per_head = case
    model = build(family, impl, seed=FAMILIES.index(family))
    ids = prompt(PROMPT_LEN, seed=7)
    mask = torch.ones_like(ids)
    out, plans = _run(model, Compressor.from_name(name, compression_ratio=RATIO, **config), ids, mask, NEW_TOKENS)

    n_keep = int(PROMPT_LEN * (1 - RATIO))
    kept = {layer: kept_prompt_columns(p)[0] for layer, p in plans.items()}
    assert_layer_budgets(name, [len(cols[0]) for cols in kept.values()], n_keep, PROMPT_LEN)
    assert all(len(cols) == len(per_head_cols[0]) for per_head_cols in kept.values() for cols in per_head_cols)
    if per_head:
        assert any(not torch.equal(cols[0], other) for cols in kept.values() for other in cols[1:]), (
            "the selections should differ between KV heads (per-head masks are what is being tested)"
        )

    # everything fed to the model: the prompt and every generated token but the last
    seq = out.sequences[:, :-1]
    full_mask = torch.ones_like(seq)
    calls = [1] * (NEW_TOKENS - 1)
    visibility = {
        layer: compressed_visibility(p, full_mask, PROMPT_LEN, calls, decode_plans) for layer, p in plans.items()
    }
    reference = decode_step_logits(masked_logits(model, seq, full_mask, visibility), PROMPT_LEN, NEW_TOKENS)
    got = torch.stack(out.logits)
    assert _max_diff(got, reference) < ATOL

    # teeth: without hiding the evicted entries, the logits differ
    unmasked = decode_step_logits(plain_logits(model, seq, full_mask), PROMPT_LEN, NEW_TOKENS)
    assert _max_diff(got[1:], unmasked[1:]) > TEETH
    if per_head:
        # ... and hiding head 0's selection from every head is not the same either
        shared = {layer: vis[:, :1].expand_as(vis) for layer, vis in visibility.items()}
        shared_ref = decode_step_logits(masked_logits(model, seq, full_mask, shared), PROMPT_LEN, NEW_TOKENS)
        assert _max_diff(got[1:], shared_ref[1:]) > TEETH
    if decode_plans:
        # ... and h2o's per-step evictions matter: a mask frozen after prefill is not the answer
        frozen = {
            layer: compressed_visibility(p[:1], full_mask, PROMPT_LEN, calls, decode_plans=False)
            for layer, p in plans.items()
        }
        frozen_ref = decode_step_logits(masked_logits(model, seq, full_mask, frozen), PROMPT_LEN, NEW_TOKENS)
        assert _max_diff(got[1:], frozen_ref[1:]) > TEETH


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "case", [c for c in EVICTION_ONLY if c[0] in ("random", "snapkv", "h2o", "tova", "vl-cache")], ids=_ids
)
def test_padded_batch_equals_masked_reference(case: tuple[str, dict[str, Any], bool, bool], impl: str) -> None:
    """Left padding and rows with different budgets (filler slots) under the same reference."""
    name, config, decode_plans, _ = case
    model = build("qwen2", impl, seed=1)
    ids, mask, _ = left_padded([21, 34, 27], seed=2)
    width = ids.shape[1]
    out, plans = _run(model, Compressor.from_name(name, compression_ratio=RATIO, **config), ids, mask, NEW_TOKENS)
    seq = out.sequences[:, :-1]
    full_mask = torch.cat([mask, torch.ones(3, NEW_TOKENS - 1, dtype=mask.dtype)], dim=1)
    calls = [1] * (NEW_TOKENS - 1)
    visibility = {layer: compressed_visibility(p, full_mask, width, calls, decode_plans) for layer, p in plans.items()}
    # padding is never kept, at any step
    for vis in visibility.values():
        assert not (vis[:, :, width:] & ~full_mask.bool()[:, None, None, :]).any()
    reference = decode_step_logits(masked_logits(model, seq, full_mask, visibility), width, NEW_TOKENS)
    got = torch.stack(out.logits)
    assert _max_diff(got, reference) < ATOL
    unmasked = decode_step_logits(plain_logits(model, seq, full_mask), width, NEW_TOKENS)
    assert _max_diff(got[1:], unmasked[1:]) > TEETH


# -- continuing on a compressed cache -----------------------------------------------------------

FIRST, EXTRA, SECOND = 4, 3, 4


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "padded-batch"])
@pytest.mark.parametrize("case", [c for c in EVICTION_ONLY if c[0] in ("snapkv", "h2o")], ids=_ids)
def test_second_generate_continues_compressed_cache(
    case: tuple[str, dict[str, Any], bool, bool], batched: bool, impl: str
) -> None:
    """Only the new tokens plus the full-length attention_mask: correct against the masked reference."""
    name, config, decode_plans, _ = case
    model = build("qwen3", impl, seed=3)
    if batched:
        ids, mask, _ = left_padded([24, 31], seed=4)
    else:
        ids = prompt(PROMPT_LEN, seed=4)
        mask = torch.ones_like(ids)
    b, width = ids.shape
    extra = torch.randint(3, 256, (b, EXTRA), generator=torch.Generator().manual_seed(5))
    compressor = Compressor.from_name(name, compression_ratio=RATIO, **config)
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model):
        first = generate(model, ids, mask, max_new_tokens=FIRST)
        cache = cache_of(first)
        # the cache holds the prompt (compressed) and all generated tokens but the last
        new_ids = torch.cat([first.sequences[:, -1:], extra], dim=1)
        history_mask = torch.cat([mask, torch.ones(b, FIRST + EXTRA, dtype=mask.dtype)], dim=1)
        second = generate(model, new_ids, history_mask, max_new_tokens=SECOND, cache=cache)
    assert second.sequences.shape == (b, 1 + EXTRA + SECOND)
    plans = recorder.per_layer(cache)

    seq = torch.cat([first.sequences, extra, second.sequences[:, -SECOND:-1]], dim=1)
    full_mask = torch.cat([mask, torch.ones(b, seq.shape[1] - width, dtype=mask.dtype)], dim=1)
    calls = [1] * (FIRST - 1) + [1 + EXTRA] + [1] * (SECOND - 1)
    visibility = {layer: compressed_visibility(p, full_mask, width, calls, decode_plans) for layer, p in plans.items()}
    start = width + FIRST + EXTRA  # the first token of the second generate comes from column start - 1
    reference = masked_logits(model, seq, full_mask, visibility)[:, start - 1 : start - 1 + SECOND].transpose(0, 1)
    got = torch.stack(second.logits)
    assert _max_diff(got, reference) < ATOL
    unmasked = plain_logits(model, seq, full_mask)[:, start - 1 : start - 1 + SECOND].transpose(0, 1)
    assert _max_diff(got, unmasked) > TEETH


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "padded-batch"])
def test_full_history_on_compressed_cache_raises(batched: bool, impl: str) -> None:
    """Re-sending the whole conversation with a compressed cache would silently re-feed tokens: an error."""
    model = build("llama", impl)
    if batched:
        ids, mask, _ = left_padded([24, 31], seed=4)
    else:
        ids = prompt(PROMPT_LEN, seed=4)
        mask = torch.ones_like(ids)
    b = ids.shape[0]
    extra = torch.randint(3, 256, (b, EXTRA), generator=torch.Generator().manual_seed(5))
    with Compressor.from_name("snapkv", compression_ratio=RATIO, window_size=4)(model):
        first = generate(model, ids, mask, max_new_tokens=FIRST)
        cache = cache_of(first)
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        history = torch.cat([first.sequences, extra], dim=1)
        history_mask = torch.cat([mask, torch.ones(b, FIRST + EXTRA, dtype=mask.dtype)], dim=1)
        with pytest.raises(InvalidInputError, match="only the tokens it has not seen"):
            generate(model, history, history_mask, max_new_tokens=2, cache=cache)
        # the refused call left the cache alone
        assert [layer.keys.shape[-2] for layer in cache.layers] == lengths


# -- sliding-window layers ----------------------------------------------------------------------

WINDOW = 8


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize(("name", "config", "decode_plans"), [("snapkv", {"window_size": 4}, False), ("h2o", {}, True)])
def test_sliding_layers_left_alone_full_layers_compressed(
    name: str, config: dict[str, Any], decode_plans: bool, impl: str
) -> None:
    model = build(
        "qwen2",
        impl,
        seed=4,
        use_sliding_window=True,
        sliding_window=WINDOW,
        layer_types=["full_attention", "sliding_attention"],
    )
    ids = prompt(24, seed=8)
    mask = torch.ones_like(ids)
    compressor = Compressor.from_name(name, compression_ratio=0.5, **config)

    # after prefill: the sliding layer's cache is exactly the uncompressed one
    plain_prefill = cache_of(generate(model, ids, max_new_tokens=1))
    with pytest.warns(UserWarning, match="sliding-window"), compressor(model) as session:
        prefill = cache_of(generate(model, ids, max_new_tokens=1))
    assert (session.report.layers_compressed, session.report.layers_skipped) == (1, 1)
    assert type(prefill.layers[1]).__name__ == "DynamicSlidingWindowLayer"
    if type(compressor).needs_accumulated_attention:
        # layer 0's prefill attention is kvpress-mm's fused one (float32 chunks): equal up to rounding
        torch.testing.assert_close(prefill.layers[1].keys, plain_prefill.layers[1].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prefill.layers[1].values, plain_prefill.layers[1].values, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(prefill.layers[1].keys, plain_prefill.layers[1].keys)
        assert torch.equal(prefill.layers[1].values, plain_prefill.layers[1].values)
    assert prefill.layers[0].keys.shape[-2] == 12

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out, plans = _run_allowing_skips(model, compressor, ids, mask)
    assert sorted(plans) == [0]
    seq = out.sequences[:, :-1]
    full_mask = torch.ones_like(seq)
    visibility = {
        0: compressed_visibility(plans[0], full_mask, 24, [1] * (NEW_TOKENS - 1), decode_plans),
        1: plain_visibility(full_mask, sliding_window=WINDOW),
    }
    reference = decode_step_logits(masked_logits(model, seq, full_mask, visibility), 24, NEW_TOKENS)
    got = torch.stack(out.logits)
    assert _max_diff(got, reference) < ATOL
    # teeth: compressing the sliding layer too, or not sliding it, would be visibly different
    no_eviction = dict(visibility)
    no_eviction[0] = plain_visibility(full_mask)
    assert (
        _max_diff(got[1:], decode_step_logits(masked_logits(model, seq, full_mask, no_eviction), 24, NEW_TOKENS)[1:])
        > TEETH
    )
    not_sliding = dict(visibility)
    not_sliding[1] = plain_visibility(full_mask)
    assert _max_diff(got, decode_step_logits(masked_logits(model, seq, full_mask, not_sliding), 24, NEW_TOKENS)) > TEETH


def _run_allowing_skips(
    model: torch.nn.Module, compressor: Compressor, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[Any, dict[int, list[Any]]]:
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model):
        out = generate(model, ids, mask, max_new_tokens=NEW_TOKENS)
    return out, recorder.per_layer(cache_of(out))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_all_sliding_mistral_runs_uncompressed(impl: str) -> None:
    """Mistral with a sliding window: every layer is sliding, nothing is compressed, output unchanged."""
    model = build("mistral", impl, sliding_window=WINDOW)
    ids = prompt(24, seed=9)
    reference = generate(model, ids, max_new_tokens=NEW_TOKENS)
    with (
        pytest.warns(UserWarning, match="sliding-window"),
        Compressor.from_name("h2o", compression_ratio=0.5)(model) as session,
    ):
        out = generate(model, ids, max_new_tokens=NEW_TOKENS)
    assert (session.report.layers_compressed, session.report.layers_skipped) == (0, 2)
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(cache_of(out).layers, cache_of(reference).layers, strict=True):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    # teeth: the sliding window really is in effect (prompt longer than the window)
    full_mask = torch.ones_like(out.sequences[:, :-1])
    unslid = decode_step_logits(plain_logits(model, out.sequences[:, :-1], full_mask), 24, NEW_TOKENS)
    assert _max_diff(torch.stack(out.logits), unslid) > TEETH
