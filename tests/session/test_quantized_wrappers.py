"""The built-in wrappers on transformers' quantized caches (quanto, HQQ, fp8): composed exactly, or refused.

The same reference as tests/session/test_quantized_caches.py: the run on a ``DynamicCache``
whose kept entries are replaced by their quantize-dequantize round trip right after every plan
(:class:`~tests.helpers.quantized.StoreRecorder`). For ``chunked-prefill`` that is after every
chunk, so each later chunk attends to the earlier chunks' entries as the quantized store holds
them - what a quantized cache gives any prefill that comes in several calls. On fp8 a later
chunk also attends to its own entries quantized (transformers' fp8 layer has no full-precision
window: it returns every entry dequantized), which that reference does not model: there only
the first chunk is compared entry by entry, the later ones by their counts.

``adakv`` (ragged heads) and ``decoding`` on quanto / HQQ (an eviction per step would
re-quantize the store) are refused before the first token, naming what works instead.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.cache_utils import QuantizedCache

from kvpress_mm import Compressor
from kvpress_mm.errors import UnsupportedCacheError
from kvpress_mm.wrappers import BUILTIN_WRAPPERS
from tests.helpers.masked_reference import cache_of
from tests.helpers.quantized import (
    ALL_CACHES,
    StoreRecorder,
    cache_params,
    dequantized,
    fresh_quantizer,
    generate_options,
)
from tests.helpers.tiny_models import PAD, assert_same_model_state, build, generate, left_padded, model_snapshot

NEW_TOKENS = 4
LENGTHS = [27, 20, 13]  # a left-padded batch: filler slots in the shorter rows

#: Every built-in wrapper that composes with a quantized cache, around a scored strategy
#: (chunked-prefill also around LOOK-M's merging, whose merged entries are stored quantized).
COMPOSING: dict[str, dict[str, Any]] = {
    "pyramid": {"strategy": "pyramid", "inner": {"strategy": "snapkv", "window_size": 4}},
    "modality-budget": {"strategy": "modality-budget", "inner": "snapkv", "text_ratio": 0.5},
    "mixkv": {"strategy": "mixkv", "inner": {"strategy": "snapkv", "window_size": 4}},
    "chunked-prefill": {
        "strategy": "chunked-prefill",
        "inner": {"strategy": "snapkv", "window_size": 4},
        "chunk_size": 8,
    },
    "chunked-prefill-lookm": {
        "strategy": "chunked-prefill",
        "inner": {"strategy": "lookm-pivotal", "window_size": 4},
        "chunk_size": 8,
    },
}


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    model = build("llama")
    with torch.no_grad():  # padding gets non-zero keys: kept filler slots must be zeroed to match the reference
        model.get_input_embeddings().weight[PAD] = torch.randn(
            model.config.hidden_size, generator=torch.Generator().manual_seed(5)
        )
    return model


def build_wrapper(case: str) -> Compressor:
    config = dict(COMPOSING[case])
    if config["strategy"] != "modality-budget":  # it takes per-modality ratios instead
        config["compression_ratio"] = 0.5
    return Compressor.from_config(config)


def test_every_composing_wrapper_is_covered() -> None:
    """adakv and decoding are refused on (some) quantized caches: tested below."""
    covered = {config["strategy"] for config in COMPOSING.values()}
    assert covered | {"adakv", "decoding"} == set(BUILTIN_WRAPPERS)


@pytest.mark.parametrize("cache", ALL_CACHES)
@pytest.mark.parametrize("case", COMPOSING)
def test_every_wrapper_composes_exactly_with_the_quantized_cache(llama: torch.nn.Module, case: str, cache: str) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    compressor = build_wrapper(case)
    quantized, reference = StoreRecorder(), StoreRecorder(qdq=fresh_quantizer(llama, cache))
    with quantized.recording(), compressor(llama):
        q_out = generate(llama, ids, mask, max_new_tokens=NEW_TOKENS, **generate_options(cache))
    with reference.recording(), compressor(llama):
        ref_out = generate(llama, ids, mask, max_new_tokens=NEW_TOKENS)
    q_cache, ref_cache = cache_of(q_out), cache_of(ref_out)
    assert type(q_cache) is QuantizedCache
    chunks = -(-ids.shape[1] // 8) if case.startswith("chunked") else 1
    assert len(quantized.stored) == len(reference.stored) == chunks * len(q_cache.layers)  # a plan per chunk
    for q, ref in zip(quantized.stored, reference.stored):
        assert q.length == ref.length
        if cache == "fp8" and not ref.prefill:  # see the module docstring
            assert q.kept_indices.shape == ref.kept_indices.shape
            continue
        assert torch.equal(q.kept_indices, ref.kept_indices)  # the same selection, chunk after chunk
        if ref.merged_keys is not None:
            assert q.merged_keys is not None and torch.equal(q.merged_keys, ref.merged_keys)
        assert torch.equal(q.keys, ref.keys) and torch.equal(q.values, ref.values)  # stored = round trip
    for layer, ref_layer in zip(q_cache.layers, ref_cache.layers):
        store, _ = dequantized(layer)
        residual = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
        # nothing stored twice, nothing lost
        assert store.shape[-2] + residual == layer.cumulative_length == layer.get_seq_length()
        assert layer.get_seq_length() == ref_layer.get_seq_length()
    if cache != "fp8":  # fp8 quantizes new entries at once; quanto / HQQ keep them in full precision
        assert torch.equal(q_out.sequences, ref_out.sequences)
        for step, ref_step in zip(q_out.logits, ref_out.logits):
            assert torch.equal(step, ref_step)


def test_pyramid_keeps_its_per_layer_budgets_on_a_quantized_cache(llama: torch.nn.Module) -> None:
    """The budgets differ by layer (else the exactness test above would not see a pyramid)."""
    ids, mask, _ = left_padded(LENGTHS)
    with build_wrapper("pyramid")(llama):
        out = generate(llama, ids, mask, max_new_tokens=1, **generate_options("fp8"))
    lengths = [layer.get_seq_length() for layer in cache_of(out).layers]
    assert len(set(lengths)) > 1, lengths


@pytest.mark.parametrize("cache", ALL_CACHES)
@pytest.mark.parametrize(
    "config",
    [
        # the default window (32) covers these short prompts: every head keeps the same entries, so
        # the plans happen to be rectangular; refused all the same, before the prefill
        {"strategy": "adakv", "compression_ratio": 0.5},
        {"strategy": "adakv", "compression_ratio": 0.5, "inner": {"strategy": "snapkv", "window_size": 2}},
        {"strategy": "chunked-prefill", "inner": "adakv", "compression_ratio": 0.5, "chunk_size": 8},
        {"strategy": "pyramid", "inner": "adakv", "compression_ratio": 0.5},
    ],
    ids=["adakv", "adakv-window-2", "chunked-prefill-adakv", "pyramid-adakv"],
)
def test_adakv_is_refused_on_quantized_caches_before_the_prefill(
    llama: torch.nn.Module, config: dict[str, Any], cache: str
) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    before = model_snapshot(llama)
    compressor = Compressor.from_config(config)
    assert compressor.plans_ragged_heads
    recorder = StoreRecorder()
    with recorder.recording(), compressor(llama):
        with pytest.raises(UnsupportedCacheError, match="cannot hold heads of different lengths") as raised:
            generate(llama, ids, mask, max_new_tokens=2, **generate_options(cache))
    assert "DynamicCache" in str(raised.value)
    assert recorder.stored == []  # nothing computed in vain
    assert_same_model_state(before, model_snapshot(llama))


def test_adakv_with_a_floor_of_n_keep_keeps_uniform_heads_and_composes() -> None:
    """alpha=1: every head keeps n_keep by its own scores, a rectangular plan a quantized layer stores."""
    assert not Compressor.from_name("adakv", compression_ratio=0.5, alpha=1.0).plans_ragged_heads


@pytest.mark.parametrize("cache", cache_params("quanto-4bit", "hqq-8bit"))
def test_decoding_is_refused_on_quanto_and_hqq_before_the_first_token(llama: torch.nn.Module, cache: str) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    compressor = Compressor.from_name("decoding", inner="snapkv", compression_ratio=0.5, max_entries=24, interval=4)
    recorder = StoreRecorder()
    with recorder.recording(), compressor(llama):
        with pytest.raises(UnsupportedCacheError, match="re-quantize the whole cache at every step") as raised:
            generate(llama, ids, mask, max_new_tokens=3, **generate_options(cache))
    # the remedy is the decoding wrapper's own (its inner strategy alone), not another strategy's option
    assert "without the decoding wrapper" in str(raised.value)
    assert "decode_eviction" not in str(raised.value)
    assert recorder.stored == []  # refused before the prefill ran


def test_decoding_bounds_an_fp8_cache_and_stores_kept_entries_exactly(llama: torch.nn.Module) -> None:
    """fp8's per-tensor scale is frozen: re-planned entries are stored as the bytes they were."""
    ids, mask, _ = left_padded(LENGTHS)
    compressor = Compressor.from_name("decoding", inner="snapkv", compression_ratio=0.5, max_entries=16, interval=4)
    recorder = StoreRecorder()
    with recorder.recording(), compressor(llama):
        out = generate(llama, ids, mask, max_new_tokens=12, **generate_options("fp8"))
    cache = cache_of(out)
    assert type(cache) is QuantizedCache
    replans = [r for r in recorder.stored if not r.prefill]
    assert replans, "no re-plan while decoding: the bound was not reached"
    for record in replans:
        assert record.length == compressor.target
        assert record.source_keys is not None and record.source_values is not None
        index = record.kept_indices[..., None].expand(-1, -1, -1, record.keys.shape[-1])
        assert torch.equal(record.keys, record.source_keys.gather(2, index))
        assert torch.equal(record.values, record.source_values.gather(2, index))
    for layer in cache.layers:
        assert layer.get_seq_length() <= 16
