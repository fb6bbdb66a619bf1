"""Compression on transformers' quantized caches (quanto, HQQ, fp8) end to end: exactly the composition.

For every built-in strategy and backend, against the same run on a ``DynamicCache``:

- the kept positions (and LOOK-M's merged entries) are the DynamicCache run's: scores come from
  the full-precision prefill attention;
- the stored entries, dequantized, are ``dequantize(quantize(kept entries))`` with the same
  backend, quantized as one tensor (filler slots included);
- the cache holds exactly the kept entries plus what was decoded, nothing twice;
- tokens and logits equal those of the DynamicCache run whose kept entries were replaced by
  that round trip right after compression (:class:`~tests.helpers.quantized.StoreRecorder`):
  positions (multimodal RoPE included), masks, padding and beams are right.

Tests of a backend whose package is missing are skipped, naming the [quant] extra.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import cache_utils
from transformers.cache_utils import DynamicCache, QuantizedCache

import tests.helpers.tiny_qwen_vlms as qwen
from kvpress_mm import Compressor
from kvpress_mm.errors import MissingDependencyError, UnsupportedCacheError
from kvpress_mm.strategies import BUILTIN_STRATEGIES
from tests.helpers.masked_reference import cache_of
from tests.helpers.quantized import (
    ALL_CACHES,
    CACHE_CONFIGS,
    StoreRecorder,
    cache_params,
    dequantized,
    fresh_quantizer,
    generate_options,
    quantized_cache,
    requires,
)
from tests.helpers.tiny_models import FAMILIES as TEXT_FAMILIES
from tests.helpers.tiny_models import (
    PAD,
    assert_same_model_state,
    build,
    generate,
    left_padded,
    model_snapshot,
    prompt,
)
from tests.helpers.tiny_vlms import FAMILIES as VLM_FAMILIES
from tests.helpers.tiny_vlms import build_vlm, generate_vlm, left_pad_batch, make_prompt

NEW_TOKENS = 4
LENGTHS = [27, 20, 13]  # a left-padded batch: filler slots in the shorter rows


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    model = build("llama")
    with torch.no_grad():  # padding gets non-zero keys: kept filler slots must be zeroed to match the reference
        model.get_input_embeddings().weight[PAD] = torch.randn(
            model.config.hidden_size, generator=torch.Generator().manual_seed(5)
        )
    return model


def strategy(name: str, cache: str, ratio: float = 0.5, **config: Any) -> Compressor:
    """``name`` at ``ratio``; ``h2o`` without decode-time eviction on quanto / HQQ (refused there)."""
    if name == "h2o" and CACHE_CONFIGS[cache]["backend"] != "fp8":
        config.setdefault("decode_eviction", False)
    return Compressor.from_name(name, compression_ratio=ratio, **config)


def run(model: torch.nn.Module, compressor: Compressor, recorder: StoreRecorder, run_generate: Any) -> Any:
    with recorder.recording(), compressor(model):
        return run_generate()


def assert_exact_composition(
    quantized: StoreRecorder, reference: StoreRecorder, q_out: Any, ref_out: Any, cache: str
) -> None:
    """Kept positions, merged and stored entries, lengths; tokens and logits when the reference is exact."""
    q_cache, ref_cache = cache_of(q_out), cache_of(ref_out)
    q_prefill, ref_prefill = quantized.prefill_of(q_cache), reference.prefill_of(ref_cache)
    assert len(q_prefill) == len(ref_prefill) == len(q_cache.layers)
    for q, ref in zip(q_prefill, ref_prefill):
        assert torch.equal(q.kept_indices, ref.kept_indices)
        if ref.merged_keys is not None:
            assert q.merged_keys is not None and torch.equal(q.merged_keys, ref.merged_keys)
        # the kept entries, quantized as one tensor (filler slots included), then dequantized
        assert torch.equal(q.keys, ref.keys) and torch.equal(q.values, ref.values)
        assert q.length == ref.kept_indices.shape[-1] == q.keys.shape[-2]
    assert type(q_cache) is QuantizedCache
    fp8 = CACHE_CONFIGS[cache]["backend"] == "fp8"
    for layer, ref_layer in zip(q_cache.layers, ref_cache.layers):
        store, _ = dequantized(layer)
        residual = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
        # nothing stored twice, nothing lost: store + residual = every entry the cache holds
        assert store.shape[-2] + residual == layer.cumulative_length == layer.get_seq_length()
        assert layer.cumulative_length == ref_layer.get_seq_length()
    assert torch.equal(q_out.logits[0], ref_out.logits[0])  # the prefill's token: full precision in both
    if not fp8:  # fp8 quantizes decoded entries at once; quanto / HQQ keep them in the residual window
        assert torch.equal(q_out.sequences, ref_out.sequences)
        for step, ref_step in zip(q_out.logits, ref_out.logits):
            assert torch.equal(step, ref_step)


@pytest.mark.parametrize("cache", ALL_CACHES)
@pytest.mark.parametrize("name", [s for s in BUILTIN_STRATEGIES if s != "full"])
def test_every_strategy_composes_exactly_with_the_quantized_cache(
    llama: torch.nn.Module, name: str, cache: str
) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    compressor = strategy(name, cache)
    quantized, reference = StoreRecorder(), StoreRecorder(qdq=fresh_quantizer(llama, cache))
    q_out = run(
        llama,
        compressor,
        quantized,
        lambda: generate(llama, ids, mask, max_new_tokens=NEW_TOKENS, **generate_options(cache)),
    )
    ref_out = run(llama, compressor, reference, lambda: generate(llama, ids, mask, max_new_tokens=NEW_TOKENS))
    assert_exact_composition(quantized, reference, q_out, ref_out, cache)
    evicts = compressor.evicts_while_decoding
    n_slots = quantized.prefill_of(cache_of(q_out))[0].length
    for layer in cache_of(q_out).layers:  # evicting h2o stays at its budget; the others grow by the decoded
        assert layer.get_seq_length() == (n_slots if evicts else n_slots + NEW_TOKENS - 1)


@pytest.mark.parametrize("cache", cache_params("quanto-4bit", "hqq-8bit"))
def test_a_cache_built_by_the_user_is_compressed_and_returned(llama: torch.nn.Module, cache: str) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    user_cache = quantized_cache(llama, cache, nbits=2 if cache == "quanto-4bit" else 8)
    with Compressor.from_name("snapkv", compression_ratio=0.5, window_size=4)(llama) as session:
        out = generate(llama, ids, mask, max_new_tokens=NEW_TOKENS, cache=user_cache)
    assert cache_of(out) is user_cache
    assert session.report.layers_compressed == len(user_cache.layers)
    n_keep = max(session.report.n_keep)
    for layer in user_cache.layers:
        assert dequantized(layer)[0].shape[-2] == n_keep
        assert layer.get_seq_length() == n_keep + NEW_TOKENS - 1


@pytest.mark.parametrize("cache", cache_params("quanto-4bit", "hqq-8bit"))
def test_decoding_past_the_residual_window_flushes_as_for_an_uncompressed_cache(
    llama: torch.nn.Module, cache: str
) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    residual_length, new_tokens = 4, 11
    options = generate_options(cache, residual_length=residual_length)
    with Compressor.from_name("streaming", compression_ratio=0.5)(llama) as session:
        out = generate(llama, ids, mask, max_new_tokens=new_tokens, **options)
    n_keep = max(session.report.n_keep)
    decoded = new_tokens - 1  # generate never feeds its last token back
    for layer in cache_of(out).layers:
        store, _ = dequantized(layer)
        residual = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
        assert residual == decoded % residual_length  # the residual filled and flushed into the store
        assert store.shape[-2] + residual == layer.cumulative_length == n_keep + decoded


@pytest.mark.parametrize("cache", ALL_CACHES)
@pytest.mark.parametrize("name", ["full", "snapkv", "h2o"])
def test_ratio_zero_leaves_the_quantized_cache_bit_identical(llama: torch.nn.Module, name: str, cache: str) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    plain = generate(llama, ids, mask, max_new_tokens=NEW_TOKENS, **generate_options(cache))
    with Compressor.from_name(name, compression_ratio=0.0)(llama):
        noop = generate(llama, ids, mask, max_new_tokens=NEW_TOKENS, **generate_options(cache))
    assert torch.equal(plain.sequences, noop.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, noop.logits))
    for a, b in zip(cache_of(plain).layers, cache_of(noop).layers):
        assert a.cumulative_length == b.cumulative_length
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)  # the residual
        for x, y in zip(dequantized(a), dequantized(b)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("cache", cache_params("quanto-4bit", "hqq-8bit"))
@pytest.mark.parametrize("name", ["snapkv", "lookm-pivotal"])
def test_beam_search_on_a_compressed_quantized_cache(llama: torch.nn.Module, name: str, cache: str) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    compressor = strategy(name, cache)
    beams = dict(num_beams=3, num_return_sequences=2, output_logits=False, output_scores=True)
    quantized, reference = StoreRecorder(), StoreRecorder(qdq=fresh_quantizer(llama, cache))
    q_out = run(llama, compressor, quantized, lambda: generate(llama, ids, mask, **beams, **generate_options(cache)))
    ref_out = run(llama, compressor, reference, lambda: generate(llama, ids, mask, **beams))
    assert torch.equal(q_out.sequences, ref_out.sequences)
    assert torch.equal(q_out.sequences_scores, ref_out.sequences_scores)
    for q, ref in zip(quantized.prefill_of(cache_of(q_out)), reference.prefill_of(cache_of(ref_out))):
        assert torch.equal(q.kept_indices, ref.kept_indices) and torch.equal(q.keys, ref.keys)


@pytest.mark.parametrize("beams", [1, 3])
def test_h2o_decode_eviction_on_an_fp8_cache_is_exact(llama: torch.nn.Module, beams: int) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    compressor = Compressor.from_name("h2o", compression_ratio=0.5, window_size=2)
    assert compressor.evicts_while_decoding
    recorder = StoreRecorder()
    with recorder.recording(), compressor(llama) as session:
        out = generate(llama, ids, mask, max_new_tokens=5, num_beams=beams, **generate_options("fp8"))
    cache = cache_of(out)
    n_keep = max(session.report.n_keep)
    for layer_idx, layer in enumerate(cache.layers):
        steps = recorder.decode_of(cache, layer_idx)
        assert len(steps) == 4  # one eviction per decode step
        assert layer.get_seq_length() == layer._quantized_keys[0].shape[-2] == n_keep
        for step in steps:
            # the kept entries are stored exactly as they were (re-quantized with the frozen scale): no drift
            assert step.source_keys is not None and step.source_values is not None
            index = step.kept_indices[..., None].expand(-1, -1, -1, step.keys.shape[-1])
            assert torch.equal(step.keys, step.source_keys.gather(2, index))
            assert torch.equal(step.values, step.source_values.gather(2, index))


@pytest.mark.parametrize("cache", cache_params("quanto-4bit", "hqq-8bit"))
def test_h2o_decode_eviction_is_refused_on_quanto_and_hqq_before_the_first_token(
    llama: torch.nn.Module, cache: str
) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    compressor = Compressor.from_name("h2o", compression_ratio=0.5)
    recorder = StoreRecorder()
    with recorder.recording(), compressor(llama):
        with pytest.raises(UnsupportedCacheError, match=r"decode_eviction=False") as raised:
            generate(llama, ids, mask, max_new_tokens=3, **generate_options(cache))
    assert "re-quantize the whole cache at every step" in str(raised.value)
    assert recorder.stored == []  # refused before the prefill ran


def family_run(family: str) -> tuple[torch.nn.Module, Any]:
    """A tiny model of ``family`` and a function that generates on a left-padded batch with images (if a VLM)."""
    if family in TEXT_FAMILIES:
        model = build(family)
        ids, mask, _ = left_padded(LENGTHS)
        return model, lambda **options: generate(model, ids, mask, max_new_tokens=NEW_TOKENS, **options)
    if family in qwen.KINDS:
        model = qwen.build(family)
        layouts = [qwen.LAYOUTS["three-images"], qwen.LAYOUTS["one-image"]]
        inputs = qwen.batch([qwen.prompt(model, layout, seed=i) for i, layout in enumerate(layouts)])
        return model, lambda **options: qwen.generate(model, inputs, max_new_tokens=NEW_TOKENS, **options)
    model = build_vlm(family)
    prompts = [make_prompt(family, model, 2, seed=0), make_prompt(family, model, 1, seed=1)]
    ids, mask, pixels = left_pad_batch(family, prompts)
    inputs = {"input_ids": ids, "attention_mask": mask, **pixels}
    return model, lambda **options: generate_vlm(model, inputs, max_new_tokens=NEW_TOKENS, **options)


#: The VLMs' full runs: LLaVA (image placeholders) and Qwen2-VL (multimodal RoPE) on every backend.
VLM_CASES = [
    pytest.param(family, cache, name, id=f"{family}-{name}-{cache}", marks=requires(CACHE_CONFIGS[cache]["backend"]))
    for family in ("llava", "qwen2_vl")
    for cache in CACHE_CONFIGS
    for name in ("snapkv", "lookm-pivotal")
]
#: Every other supported family, once.
FAMILY_CASES = [
    pytest.param(family, "quanto-4bit", "lookm-pivotal", id=family, marks=requires("quanto"))
    for family in (*TEXT_FAMILIES[1:], *VLM_FAMILIES[1:], *qwen.KINDS[1:])
]


@pytest.mark.parametrize(("family", "cache", "name"), VLM_CASES + FAMILY_CASES)
def test_every_family_on_a_quantized_cache(family: str, cache: str, name: str) -> None:
    model, run_generate = family_run(family)
    compressor = strategy(name, cache, window_size=4)
    quantized, reference = StoreRecorder(), StoreRecorder(qdq=fresh_quantizer(model, cache))
    q_out = run(model, compressor, quantized, lambda: run_generate(**generate_options(cache)))
    ref_out = run(model, compressor, reference, run_generate)
    assert_exact_composition(quantized, reference, q_out, ref_out, cache)


@requires("quanto")
def test_the_reference_run_is_not_the_dynamic_cache_run(llama: torch.nn.Module) -> None:
    """The exactness checks can fail: quantization changes the stored entries and, here, the logits."""
    ids, mask, _ = left_padded(LENGTHS)
    compressor = Compressor.from_name("snapkv", compression_ratio=0.5, window_size=4)
    plain, quantized = StoreRecorder(), StoreRecorder()
    dyn = run(
        llama,
        compressor,
        plain,
        lambda: generate(llama, ids, mask, max_new_tokens=NEW_TOKENS, cache=DynamicCache(config=llama.config)),
    )
    q_out = run(
        llama,
        compressor,
        quantized,
        lambda: generate(llama, ids, mask, max_new_tokens=NEW_TOKENS, **generate_options("quanto-4bit", nbits=2)),
    )
    q0, d0 = quantized.prefill_of(cache_of(q_out))[0], plain.prefill_of(cache_of(dyn))[0]
    assert torch.equal(q0.kept_indices, d0.kept_indices)
    assert not torch.equal(q0.keys, d0.keys)
    assert not torch.equal(q_out.logits[1], dyn.logits[1])


@requires("quanto")
def test_a_group_size_that_does_not_fit_the_kept_entries_raises_and_leaves_the_model_as_found(
    llama: torch.nn.Module,
) -> None:
    # transformers' default q_group_size 64 fits the 26-entry prompt (2 heads x 26 x 16 = 13 groups)
    # but not the 13 entries kept at ratio 0.5
    before = model_snapshot(llama)
    options = generate_options("quanto-4bit", q_group_size=64)
    generate(llama, prompt(26), max_new_tokens=2, **options)
    with Compressor.from_name("snapkv", compression_ratio=0.5, window_size=4)(llama):
        with pytest.raises(UnsupportedCacheError, match=r"q_group_size=64.*divides head_dim \(16\)"):
            generate(llama, prompt(26), max_new_tokens=2, **options)
    assert_same_model_state(before, model_snapshot(llama))


@requires("quanto")
def test_the_report_counts_the_quantized_bytes(llama: torch.nn.Module) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    with Compressor.from_name("snapkv", compression_ratio=0.5, window_size=4)(llama) as session:
        generate(llama, ids, mask, max_new_tokens=1, **generate_options("quanto-4bit"))
    width, n_keep = ids.shape[1], max(session.report.n_keep)
    # 4 bits per element, plus a float32 scale and shift per group of 16 elements: 1 byte per element
    per_entry = 2 * 2 * 16 * 1  # keys + values, 2 KV heads, head_dim 16
    layers = llama.config.num_hidden_layers
    assert session.report.kv_bytes_before == layers * len(LENGTHS) * width * per_entry  # the prompt, quantized
    assert session.report.kv_bytes_after == layers * len(LENGTHS) * n_keep * per_entry


@requires("quanto")
def test_a_compressed_quantized_cache_continued_under_an_evicting_strategy_is_refused(llama: torch.nn.Module) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    with Compressor.from_name("snapkv", compression_ratio=0.5, window_size=4)(llama):
        out = generate(llama, ids, mask, max_new_tokens=2, **generate_options("quanto-4bit"))
    cache = cache_of(out)
    following = torch.cat([mask, torch.ones(len(LENGTHS), 2, dtype=mask.dtype)], dim=1)
    with Compressor.from_name("h2o", compression_ratio=0.5)(llama):
        with pytest.raises(UnsupportedCacheError, match="decode_eviction=False"):
            llama(input_ids=out.sequences[:, -1:], attention_mask=following, cache=cache)


@requires("quanto")
def test_row_selection_on_a_compressed_quantized_cache_is_refused(llama: torch.nn.Module) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    with Compressor.from_name("snapkv", compression_ratio=0.5, window_size=4)(llama):
        out = generate(llama, ids, mask, max_new_tokens=2, **generate_options("quanto-4bit"))
    cache = cache_of(out)
    with pytest.raises(UnsupportedCacheError, match="residual only"):
        cache.batch_select_indices(torch.tensor([1, 0, 2]))
    cache.reorder_cache(torch.tensor([1, 0, 2]))  # what beam search calls: supported


@pytest.mark.parametrize("cache", cache_params("quanto-4bit", "hqq-8bit"))
def test_a_second_turn_continues_the_compressed_quantized_cache_exactly(llama: torch.nn.Module, cache: str) -> None:
    ids, mask, _ = left_padded(LENGTHS)
    compressor = strategy("lookm-pivotal", cache)
    quantized, reference = StoreRecorder(), StoreRecorder(qdq=fresh_quantizer(llama, cache))
    q_out = run(llama, compressor, quantized, lambda: generate(llama, ids, mask, **generate_options(cache)))
    ref_out = run(llama, compressor, reference, lambda: generate(llama, ids, mask))
    # the next turn: the tokens the cache has not seen, with the whole conversation's mask
    turn = torch.cat([q_out.sequences[:, -1:], prompt(5, seed=9).expand(len(LENGTHS), -1)], dim=1)
    conversation = torch.cat([mask, torch.ones(len(LENGTHS), q_out.sequences.shape[1] - ids.shape[1] + 5)], dim=1)
    with torch.no_grad(), compressor(llama):
        q_next = llama(input_ids=turn, attention_mask=conversation.long(), cache=cache_of(q_out)).logits
        ref_next = llama(input_ids=turn, attention_mask=conversation.long(), cache=cache_of(ref_out)).logits
    assert torch.equal(q_next, ref_next)
    assert type(cache_of(q_out)) is QuantizedCache


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_a_missing_backend_names_the_extra_and_fp8_needs_none(
    llama: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, ratio: float
) -> None:
    monkeypatch.setattr(cache_utils, "is_hqq_available", lambda: False)
    monkeypatch.setattr(cache_utils, "is_optimum_quanto_available", lambda: False)
    ids, mask, _ = left_padded(LENGTHS)
    with Compressor.from_name("snapkv", compression_ratio=ratio)(llama):
        for backend, package in (("hqq", "hqq"), ("quanto", "optimum-quanto")):
            with pytest.raises(MissingDependencyError, match=rf"needs {package}.*pip install 'kvpress-mm\[quant\]'"):
                generate(
                    llama,
                    ids,
                    mask,
                    max_new_tokens=2,
                    cache_implementation="quantized",
                    cache_config={"backend": backend},
                )
        out = generate(llama, ids, mask, max_new_tokens=2, **generate_options("fp8"))
    assert type(cache_of(out)) is QuantizedCache
