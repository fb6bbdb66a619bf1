"""The model is left exactly as found, whatever happens inside the ``with`` block; clear errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, cache_utils
from transformers.cache_utils import DynamicCache

import kvpress_mm.session.context as session_module
from kvpress_mm import Compressor
from kvpress_mm.errors import (
    CompressorAlreadyActiveError,
    InvalidInputError,
    MissingDependencyError,
    UnsupportedCacheError,
    UnsupportedModelError,
)
from tests.helpers.masked_reference import cache_of
from tests.helpers.quantized import INSTALL, backend_available, generate_options
from tests.helpers.tiny_models import (
    FAMILIES,
    assert_same_model_state,
    build,
    build_gpt2,
    generate,
    hook_count,
    left_padded,
    model_snapshot,
    prompt,
)

IMPLS = ["sdpa", "eager"]


class BoomError(RuntimeError):
    pass


class RaiseAtStep(LogitsProcessor):
    """Raises once generation has produced ``step`` tokens (after compression happened)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.step:
            raise BoomError("raised from inside generate")
        return scores


def _ok(model: torch.nn.Module) -> None:
    generate(model, prompt(24), max_new_tokens=3)


def _raise_mid_generation(model: torch.nn.Module) -> None:
    processor = RaiseAtStep(2)
    with pytest.raises(BoomError):
        generate(model, prompt(24), max_new_tokens=5, logits_processor=LogitsProcessorList([processor]))
    assert processor.calls == 3


def _raise_in_cache_surgery(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(layer: Any, plan: Any, *source: Any) -> None:
        raise BoomError("raised while applying a plan")

    monkeypatch.setattr(session_module, "apply_plan", broken)
    with pytest.raises(BoomError):
        generate(model, prompt(24), max_new_tokens=3)


def _right_padded(model: torch.nn.Module) -> None:
    ids = torch.stack([prompt(16)[0], prompt(16, seed=1)[0]])
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    with pytest.raises(InvalidInputError, match="pad on the left"):
        generate(model, ids, mask, max_new_tokens=3)


def _static_cache(model: torch.nn.Module) -> None:
    # the message names the caches that work, quantized ones (the low-memory option) included
    with pytest.raises(UnsupportedCacheError, match=r"StaticLayer .*DynamicCache.*cache_implementation='quantized'"):
        generate(model, prompt(24), max_new_tokens=3, cache_implementation="static")


def _offloaded_cache(model: torch.nn.Module) -> None:
    cache = DynamicCache(config=model.config, offloading=True)
    with pytest.raises(UnsupportedCacheError, match=r"offloaded cache .*cache_implementation='quantized'"):
        generate(model, prompt(24), max_new_tokens=3, cache=cache)


def _quantized_cache_evicting_while_decoding(model: torch.nn.Module) -> None:
    if not backend_available("quanto"):
        pytest.skip(f"optimum-quanto is not installed: {INSTALL}")
    with pytest.raises(UnsupportedCacheError, match="decode_eviction=False"):  # h2o evicts while decoding
        generate(model, prompt(24), max_new_tokens=3, **generate_options("quanto-4bit"))


def _quantized_cache_extra_missing(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_utils, "is_optimum_quanto_available", lambda: False)
    with pytest.raises(MissingDependencyError, match=r"pip install 'kvpress-mm\[quant\]'"):
        generate(model, prompt(24), max_new_tokens=3, cache_implementation="quantized")


def _beam_search(model: torch.nn.Module) -> None:
    generate(model, prompt(24), max_new_tokens=4, num_beams=3)


def _chunked_prefill(model: torch.nn.Module) -> None:
    with pytest.raises(InvalidInputError, match="chunked prefill"):
        generate(model, prompt(24), max_new_tokens=3, prefill_chunk_size=8)


SCENARIOS: dict[str, Callable[..., None]] = {
    "ok": _ok,
    "beam-search": _beam_search,
    "chunked-prefill": _chunked_prefill,
    "raise-mid-generation": _raise_mid_generation,
    "raise-in-cache-surgery": _raise_in_cache_surgery,
    "right-padded-input": _right_padded,
    "static-cache": _static_cache,
    "offloaded-cache": _offloaded_cache,
    "quantized-cache-evicting-while-decoding": _quantized_cache_evicting_while_decoding,
    "quantized-cache-extra-missing": _quantized_cache_extra_missing,
}
#: The scenarios that patch something (undone before the model is checked).
PATCHING = ("raise-in-cache-surgery", "quantized-cache-extra-missing")


#: transformers' own warning for a row whose last column is padding (the cases below that test it)
RIGHT_PADDING = pytest.mark.transformers_warning("right-padding was detected")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "scenario", [pytest.param(s, marks=RIGHT_PADDING) if s == "right-padded-input" else s for s in SCENARIOS]
)
def test_model_left_as_found(scenario: str, impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    family = FAMILIES[list(SCENARIOS).index(scenario) % len(FAMILIES)]
    model = build(family, impl)
    before = model_snapshot(model)
    assert hook_count(model) == 0
    reference = generate(model, prompt(24, seed=3), max_new_tokens=4)
    run = SCENARIOS[scenario]
    with Compressor.from_name("h2o", compression_ratio=0.5)(model):
        # the session is really installed (so the checks below are not vacuous)
        assert hook_count(model) > 0
        assert model.config._attn_implementation == f"kvpress_mm_{impl}"
        if scenario in PATCHING:
            run(model, monkeypatch)
        else:
            run(model)
    monkeypatch.undo()
    assert hook_count(model) == 0
    assert_same_model_state(before, model_snapshot(model))
    # and the model behaves as before, bit for bit
    after = generate(model, prompt(24, seed=3), max_new_tokens=4)
    assert torch.equal(after.sequences, reference.sequences)
    for got, want in zip(after.logits, reference.logits, strict=True):
        assert torch.equal(got, want)
    # a new session can be entered again
    with Compressor.from_name("snapkv", compression_ratio=0.5)(model):
        _ok(model)
    assert_same_model_state(before, model_snapshot(model))


@pytest.mark.parametrize("impl", IMPLS)
def test_exception_raised_inside_the_block_propagates_and_restores(impl: str) -> None:
    model = build("qwen3", impl)
    before = model_snapshot(model)
    with pytest.raises(BoomError), Compressor.from_name("lookm-pivotal", compression_ratio=0.8)(model):
        generate(model, prompt(24), max_new_tokens=2)
        raise BoomError("user code failed after generate")
    assert_same_model_state(before, model_snapshot(model))


def test_snapshot_detects_leftovers() -> None:
    """The state checks have teeth: a hook, a config change or a weight change is noticed."""
    model = build("llama", "sdpa")
    before = model_snapshot(model)
    handle = model.model.layers[0].self_attn.register_forward_hook(lambda *a, **k: None, with_kwargs=True)
    with pytest.raises(AssertionError, match="hooks left"):
        assert_same_model_state(before, model_snapshot(model))
    handle.remove()
    model.set_attn_implementation("eager")
    with pytest.raises(AssertionError):
        assert_same_model_state(before, model_snapshot(model))
    model.set_attn_implementation("sdpa")
    model._prefill = lambda *args, **kwargs: None  # a method wrapped on the instance and left behind
    with pytest.raises(AssertionError, match="functions left on module instances"):
        assert_same_model_state(before, model_snapshot(model))
    del model._prefill
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    with pytest.raises(AssertionError, match="lm_head"):
        assert_same_model_state(before, model_snapshot(model))


# -- clear errors ---------------------------------------------------------------------------------


def test_unsupported_model_names_supported_families() -> None:
    model = build_gpt2()
    before = model_snapshot(model)
    with pytest.raises(UnsupportedModelError) as info, Compressor.from_name("snapkv")(model):
        pass
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    assert "Supported families" in message
    for family in ("Llama", "Mistral", "Qwen2", "Qwen3"):
        assert family in message
    assert_same_model_state(before, model_snapshot(model))
    with (
        pytest.raises(UnsupportedModelError, match="Supported families"),
        Compressor.from_name("snapkv")(torch.nn.Linear(2, 2)),
    ):
        pass


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_prompt_raises(impl: str) -> None:
    model = build("mistral", impl)
    before = model_snapshot(model)
    empty = torch.zeros(1, 0, dtype=torch.long)
    with Compressor.from_name("h2o", compression_ratio=0.5)(model):
        with pytest.raises(InvalidInputError, match="empty prompt"):
            generate(model, empty, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
        with pytest.raises(InvalidInputError, match="empty prompt"):
            model(input_ids=empty)
    assert_same_model_state(before, model_snapshot(model))


@RIGHT_PADDING  # an all-padding row ends with padding
@pytest.mark.parametrize("impl", IMPLS)
def test_all_padding_row_raises(impl: str) -> None:
    model = build("qwen2", impl)
    ids, mask, _ = left_padded([12, 16])
    mask[0] = 0
    with Compressor.from_name("snapkv", compression_ratio=0.5)(model), pytest.raises(InvalidInputError):
        generate(model, ids, mask, max_new_tokens=2)


def test_other_attention_implementation_raises_clearly() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("e2e_custom_attention", sdpa_attention_forward)
    AttentionMaskInterface.register("e2e_custom_attention", sdpa_mask)
    model = build("llama", "sdpa")
    model.set_attn_implementation("e2e_custom_attention")
    before = model_snapshot(model)
    with pytest.raises(UnsupportedModelError) as info, Compressor.from_name("h2o")(model):
        pass
    message = str(info.value)
    assert "e2e_custom_attention" in message and "sdpa" in message and "eager" in message
    assert_same_model_state(before, model_snapshot(model))


@pytest.mark.parametrize("impl", IMPLS)
def test_nested_sessions_on_one_model_raise(impl: str) -> None:
    model = build("qwen3", impl)
    before = model_snapshot(model)
    outer = Compressor.from_name("snapkv", compression_ratio=0.5)
    inner = Compressor.from_name("h2o", compression_ratio=0.5)
    with outer(model) as session:
        inside = model_snapshot(model)
        with pytest.raises(CompressorAlreadyActiveError, match="already active"), inner(model):
            pass
        # the failed inner entry disturbed nothing: the outer session still works
        assert_same_model_state(inside, model_snapshot(model))
        out = generate(model, prompt(24), max_new_tokens=3)
        assert session.report.layers_compressed == 2
        assert cache_of(out).layers[0].keys.shape[-2] == 12 + 2
        # the same compressor twice is just as nested
        with pytest.raises(CompressorAlreadyActiveError), outer(model):
            pass
    assert_same_model_state(before, model_snapshot(model))
    with inner(model):  # fine once the outer session is gone
        _ok(model)
    assert_same_model_state(before, model_snapshot(model))


@pytest.mark.parametrize("impl", IMPLS)
def test_manual_decode_loop_needs_right_positions(impl: str) -> None:
    """A hand-written decode loop on a compressed cache: absolute positions work, wrong ones raise."""
    model = build("llama", impl)
    ids = prompt(24)
    with Compressor.from_name("snapkv", compression_ratio=0.5, window_size=4)(model):
        out = generate(model, ids, max_new_tokens=3)
        cache = cache_of(out)
        token = out.sequences[:, -1:]
        with torch.no_grad():
            # positions from the (shorter) cache length: refused
            with pytest.raises(InvalidInputError, match="position"):
                model(input_ids=token, cache=cache)
            with pytest.raises(InvalidInputError, match="only the tokens it has not seen"):
                model(input_ids=token, cache=cache, position_ids=torch.tensor([[cache.get_seq_length()]]))
            manual = model(input_ids=token, cache=cache, position_ids=torch.tensor([[24 + 2]])).logits
    # the same step through generate gives the same logits
    with Compressor.from_name("snapkv", compression_ratio=0.5, window_size=4)(model):
        reference = generate(model, ids, max_new_tokens=4)
    assert (manual[:, -1] - reference.logits[3]).abs().max().item() < 1e-5
