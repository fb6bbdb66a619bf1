"""End-to-end generate on tiny random text models: cache sizes, real memory release, no-op identity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvpress_mm import Compressor
from kvpress_mm.cache.growing import DEFAULT_HEADROOM as GROWING_HEADROOM
from kvpress_mm.ops import views as layer_module
from kvpress_mm.session import attention as attention_module
from kvpress_mm.session import prefill as prefill_module
from kvpress_mm.session.context import CompressionSession
from kvpress_mm.strategies import BUILTIN_STRATEGIES, LAYER_ADAPTIVE_STRATEGIES
from tests.helpers.masked_reference import PlanRecorder, cache_of
from tests.helpers.tiny_models import FAMILIES, build, generate, left_padded, prompt

# every family is exercised, without multiplying the cases
FAMILY_OF = {name: FAMILIES[i % len(FAMILIES)] for i, name in enumerate(BUILTIN_STRATEGIES)}
IMPLS = ["sdpa", "eager"]
PROMPT_LEN = 27
NEW_TOKENS = 4


def _decode_evicts(name: str, compressor: Compressor) -> bool:
    return name == "h2o" and bool(getattr(compressor, "decode_eviction", False))


@pytest.mark.parametrize("ratio", [0.5, 0.9])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", BUILTIN_STRATEGIES)
def test_cache_holds_n_keep_after_prefill(name: str, impl: str, ratio: float) -> None:
    model = build(FAMILY_OF[name], impl)
    ids = prompt(PROMPT_LEN)
    compressor = Compressor.from_name(name, compression_ratio=ratio)
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model) as session:
        out = generate(model, ids, max_new_tokens=NEW_TOKENS)
    cache = cache_of(out)
    # the budget, evaluated literally as the spec says (not through the library's helper)
    n_keep = PROMPT_LEN if name == "full" else max(1, int(PROMPT_LEN * (1 - ratio)))
    assert out.sequences.shape == (1, PROMPT_LEN + NEW_TOKENS)
    assert len(out.logits) == NEW_TOKENS
    plans = recorder.per_layer(cache)
    n_layers = len(cache.layers)
    evicts = _decode_evicts(name, compressor)
    adaptive = name in LAYER_ADAPTIVE_STRATEGIES
    if name == "full":
        assert plans == {}
        assert session.report.layers_compressed == 0
    else:
        assert sorted(plans) == list(range(n_layers)), "every layer is compressed after its prefill"
        kept = [layer_plans[0].length_after for layer_plans in plans.values()]
        if adaptive:  # per-layer budgets, the same total
            assert sum(kept) == n_layers * n_keep and all(1 <= k <= PROMPT_LEN for k in kept)
        else:
            assert kept == [n_keep] * n_layers
        for layer_plans in plans.values():
            assert layer_plans[0].length_before == PROMPT_LEN
            # h2o's decode eviction brings every step back to n_keep; others compress once
            assert len(layer_plans) == (NEW_TOKENS if evicts else 1)
            for step in layer_plans[1:]:
                assert (step.length_before, step.length_after) == (n_keep + 1, n_keep)
        assert session.report.layers_compressed == n_layers
        assert session.report.n_keep == (n_keep,)
        head_dim, kv_heads = cache.layers[0].keys.shape[-1], cache.layers[0].keys.shape[1]
        per_entry = 2 * kv_heads * head_dim * 4  # keys + values, float32
        assert session.report.kv_bytes_before == n_layers * PROMPT_LEN * per_entry
        assert session.report.kv_bytes_after == n_layers * n_keep * per_entry
    for i, layer in enumerate(cache.layers):
        kept_after_prefill = plans[i][0].length_after if name != "full" else n_keep
        expected_final = kept_after_prefill if evicts else kept_after_prefill + NEW_TOKENS - 1
        assert layer.keys.shape[-2] == expected_final
        assert layer.values.shape[-2] == expected_final
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
    assert all(torch.isfinite(step).all() for step in out.logits)


@pytest.mark.parametrize("growing", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", [s for s in BUILTIN_STRATEGIES if s != "full"])
def test_compressed_cache_owns_only_kept_entries(name: str, impl: str, growing: bool) -> None:
    """After prefill the cache's storage holds exactly n_keep entries (no view of the old one, no headroom).

    With the session's growing layers (the default) as with ``DynamicLayer``.
    """
    model = build(FAMILY_OF[name], impl)
    ids = prompt(PROMPT_LEN)
    with Compressor.from_name(name, compression_ratio=0.7)(model, growing_cache=growing):
        out = generate(model, ids, max_new_tokens=1)  # prefill only: the cache is as compression left it
    n_keep = max(1, int(PROMPT_LEN * (1 - 0.7)))
    layers = cache_of(out).layers
    lengths = [layer.keys.shape[2] for layer in layers]
    if name in LAYER_ADAPTIVE_STRATEGIES:
        assert sum(lengths) == len(layers) * n_keep
    else:
        assert lengths == [n_keep] * len(layers)
    for layer, capacity in zip(layers, lengths, strict=True):
        for tensor in (layer.keys, layer.values):
            b, heads, n, dim = tensor.shape
            assert tensor.untyped_storage().nbytes() == b * heads * capacity * dim * tensor.element_size()
            assert tensor.storage_offset() == 0


@pytest.mark.parametrize("name", ["snapkv", "h2o", "lookm-pivotal"])
def test_growing_layers_add_headroom_once_not_a_copy_of_the_prompt(name: str) -> None:
    """The first decode step reallocates once to n_keep + 1 + GROWING_HEADROOM; later steps append in place.

    Growth is geometric in the decoded entries only: the compressed prompt part is never doubled.
    """
    from kvpress_mm.cache.growing import GrowingLayer

    model = build(FAMILY_OF[name], "sdpa")
    ids = prompt(PROMPT_LEN)
    with Compressor.from_name(name, compression_ratio=0.7)(model):
        out = generate(model, ids, max_new_tokens=5)  # 4 decode steps after the prefill
    n_keep = max(1, int(PROMPT_LEN * (1 - 0.7)))
    for layer in cache_of(out).layers:
        assert isinstance(layer, GrowingLayer)
        assert layer.capacity == n_keep + 1 + GROWING_HEADROOM
        assert layer.reallocations == 2  # the adoption (exact) and the first append


def _cache_tensors(out: object) -> list[torch.Tensor]:
    return [t for layer in cache_of(out).layers for t in (layer.keys, layer.values)]


def _assert_bit_identical(out: object, reference: object) -> None:
    assert torch.equal(out.sequences, reference.sequences)  # type: ignore[attr-defined]
    for got, want in zip(out.scores, reference.scores, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(got, want)
    for got, want in zip(out.logits, reference.logits, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(got, want)
    for got, want in zip(_cache_tensors(out), _cache_tensors(reference), strict=True):
        assert got.shape == want.shape and torch.equal(got, want)


NOOP_CASES = [(name, 0.0) for name in BUILTIN_STRATEGIES] + [("full", 0.5), ("full", 0.9)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "ratio"), NOOP_CASES)
def test_noop_is_bit_identical_to_no_compressor(name: str, ratio: float, impl: str) -> None:
    model = build(FAMILY_OF[name], impl)
    ids = prompt(PROMPT_LEN)
    batch_ids, batch_mask, _ = left_padded([19, 26], seed=3)
    reference = generate(model, ids, max_new_tokens=NEW_TOKENS)
    batch_reference = generate(model, batch_ids, batch_mask, max_new_tokens=NEW_TOKENS)
    compressor = Compressor.from_name(name, compression_ratio=ratio)
    with compressor(model) as session:
        # the session is really in the loop: the attention goes through its wrapper
        assert str(model.config._attn_implementation).startswith("kvpress_mm_")
        out = generate(model, ids, max_new_tokens=NEW_TOKENS)
        assert session.report.prompt_lengths == (PROMPT_LEN,)
        batch_out = generate(model, batch_ids, batch_mask, max_new_tokens=NEW_TOKENS)
        assert session.report.prompt_lengths == (19, 26)
    _assert_bit_identical(out, reference)
    _assert_bit_identical(batch_out, batch_reference)


def test_compression_changes_output_where_noop_does_not() -> None:
    """The identity check above has teeth: a compressing run does differ from the uncompressed one."""
    model = build("qwen3", "sdpa")
    ids = prompt(PROMPT_LEN)
    reference = generate(model, ids, max_new_tokens=NEW_TOKENS)
    with Compressor.from_name("h2o", compression_ratio=0.5)(model):
        out = generate(model, ids, max_new_tokens=NEW_TOKENS)
    assert _cache_tensors(out)[0].shape != _cache_tensors(reference)[0].shape
    assert max((a - b).abs().max().item() for a, b in zip(out.logits[1:], reference.logits[1:])) > 1e-3
    # the first token comes from the prefill, which always sees the full prompt; h2o's prefill
    # attention is kvpress-mm's fused one (output and column sums in float32 chunks): equal up to rounding
    torch.testing.assert_close(out.logits[0], reference.logits[0], atol=1e-5, rtol=1e-5)
    with Compressor.from_name("snapkv", compression_ratio=0.5)(model):
        out = generate(model, ids, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.logits[0], reference.logits[0])  # the model's own prefill attention


# -- fused prefill attention (h2o, LOOK-M): output and column sums from one softmax -----------


class _CallCounter:
    """Counts the calls of a function (patched where the session / the layer view look it up)."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.function(*args, **kwargs)


def _count_statistics(monkeypatch: pytest.MonkeyPatch) -> tuple[_CallCounter, _CallCounter]:
    """``(fused, lazy)``: calls of the fused prefill attention, and of the lazy column sums."""
    fused = _CallCounter(prefill_module.attention_with_column_sums)
    lazy = _CallCounter(layer_module.attention_column_sums)
    monkeypatch.setattr(prefill_module, "attention_with_column_sums", fused)
    monkeypatch.setattr(layer_module, "attention_column_sums", lazy)
    return fused, lazy


def _prefill_plans(
    model: torch.nn.Module, name: str, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]:
    recorder = PlanRecorder()
    with recorder.recording(), Compressor.from_name(name, compression_ratio=0.6)(model):
        out = generate(model, ids, mask, max_new_tokens=NEW_TOKENS)
    layers = recorder.per_layer(cache_of(out))
    return out, [(plans[0].kept_indices, plans[0].slot_valid) for _, plans in sorted(layers.items())]


@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "family"), [("h2o", "llama"), ("lookm-pivotal", "qwen2")])
def test_fused_prefill_matches_the_lazy_path(
    name: str, family: str, impl: str, padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same kept entries and the same logits whether the prefill attention is fused or not."""
    model = build(family, impl)
    if padded:
        ids, mask, _ = left_padded([19, 26, 23], seed=5)
    else:
        ids = prompt(PROMPT_LEN)
        mask = torch.ones_like(ids)
    layers = model.config.num_hidden_layers
    fused, lazy = _count_statistics(monkeypatch)
    out, plans = _prefill_plans(model, name, ids, mask)
    # fused: the sums come with the attention, no second pass over the prompt
    assert (fused.calls, lazy.calls) == (layers, 0)
    monkeypatch.setattr(CompressionSession, "fused_prefill", False)
    reference, reference_plans = _prefill_plans(model, name, ids, mask)
    assert (fused.calls, lazy.calls) == (layers, layers)
    assert len(plans) == len(reference_plans) == layers
    for (kept, valid), (kept_ref, valid_ref) in zip(plans, reference_plans, strict=True):
        assert torch.equal(kept, kept_ref) and torch.equal(valid, valid_ref)
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BUILTIN_STRATEGIES)
def test_fused_prefill_only_for_strategies_that_declare_it(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("llama", "sdpa")
    fused, lazy = _count_statistics(monkeypatch)
    with Compressor.from_name(name, compression_ratio=0.6)(model):
        generate(model, prompt(PROMPT_LEN), max_new_tokens=2)
    declared = type(Compressor.from_name(name)).needs_accumulated_attention
    assert declared == (name == "h2o" or name.startswith("lookm-"))
    assert fused.calls == (model.config.num_hidden_layers if declared else 0)
    # observation windows (snapkv's, tova's last query) come from the lazy column sums
    assert lazy.calls == (model.config.num_hidden_layers if name in ("snapkv", "tova") else 0)


def test_fused_prefill_falls_back_where_it_would_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention weights asked for (eager), training mode, autograd: the model's own attention runs."""
    layers = 2
    fused, lazy = _count_statistics(monkeypatch)
    ids = prompt(PROMPT_LEN)
    compressor = Compressor.from_name("h2o", compression_ratio=0.6)

    model = build("llama", "eager")
    reference = model(ids, output_attentions=True).attentions
    with compressor(model):
        out = model(ids, output_attentions=True)
    assert (fused.calls, lazy.calls) == (0, layers)
    for got, want in zip(out.attentions, reference, strict=True):
        torch.testing.assert_close(got, want)

    with compressor(model), torch.no_grad():
        model.train()  # dropout is 0 in the config, but the module is in training mode
        model(ids)
        model.eval()
    assert (fused.calls, lazy.calls) == (0, 2 * layers)

    with compressor(model):
        model(ids).logits.sum().backward()  # autograd: no in-place chunk buffers
    assert (fused.calls, lazy.calls) == (0, 3 * layers)

    with compressor(model), torch.no_grad():
        model(ids)
    assert (fused.calls, lazy.calls) == (layers, 3 * layers)


@pytest.mark.parametrize("wrapped", ["sdpa", "eager"])
def test_fused_prefill_mask_check(wrapped: str) -> None:
    """Only exactly causal + the call's padding passes; any other mask keeps the model's attention."""
    from transformers.masking_utils import eager_mask, sdpa_mask

    key_valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    build_mask = sdpa_mask if wrapped == "sdpa" else eager_mask
    mask = build_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=key_valid)
    assert attention_module.mask_is_causal_with_padding(mask, key_valid, wrapped)
    # a different padding than the modality map's
    assert not attention_module.mask_is_causal_with_padding(mask, torch.ones(2, 6, dtype=torch.bool), wrapped)
    # one more hidden key (a sliding window, a packed sequence, a custom 4-D mask)
    changed = mask.clone()
    changed[1, 0, 5, 0] = False if wrapped == "sdpa" else torch.finfo(changed.dtype).min
    assert not attention_module.mask_is_causal_with_padding(changed, key_valid, wrapped)
    # one future key visible
    changed = mask.clone()
    changed[1, 0, 2, 4] = True if wrapped == "sdpa" else 0.0
    assert not attention_module.mask_is_causal_with_padding(changed, key_valid, wrapped)
    # an additive mask for sdpa, a bool one for eager, wrong shapes
    assert not attention_module.mask_is_causal_with_padding(
        mask.float() if wrapped == "sdpa" else mask == 0, key_valid, wrapped
    )
    assert not attention_module.mask_is_causal_with_padding(mask[:, :, :5], key_valid, wrapped)


@pytest.mark.parametrize("name", [s for s in BUILTIN_STRATEGIES if s != "full"])
def test_a_forward_with_gradients_enabled_compresses_like_one_without(name: str) -> None:
    """A plain ``model(...)`` outside ``torch.no_grad()`` (as in a training loop) compresses the same.

    Regression: the LOOK-M merges' similarity used ``torch.mm(..., out=)``, which autograd refuses.
    """
    model = build(FAMILY_OF[name], "sdpa")
    ids = prompt(PROMPT_LEN)
    kept = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), Compressor.from_name(name, compression_ratio=0.5)(model):
            out = model(input_ids=ids, use_cache=True)
        kept.append([layer.keys.detach() for layer in cache_of(out).layers])
    for with_grad, without in zip(*kept, strict=True):
        assert with_grad.shape[-2] < PROMPT_LEN
        torch.testing.assert_close(with_grad, without)
