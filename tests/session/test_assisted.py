"""Assisted (speculative) decoding on a compressed cache: exactly the tokens of the plain compressed run.

In greedy assisted decoding the target model verifies drafted tokens and keeps those it would
have produced itself, so its output is the target's greedy output whatever the drafter does.
Under a compressor that means: the tokens of the same compressor's greedy run without an
assistant. Every drafter transformers offers for these models is driven: another model of the
same vocabulary (a VLM or a text LM), n-gram prompt lookup, a model with another tokenizer
(universal assisted generation), the target's own first layers (early exit, text LMs), and
compressed assistants. Drafters are forced to draft 3 tokens every round so that most rounds
reject some, and a spy on ``crop`` proves the rollback ran.

Strategies whose decode step evicts (``h2o`` with ``decode_eviction``) cannot be rolled back:
refused before the first token. transformers itself refuses assisted decoding with a batch
of several rows: its refusal comes through unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers.cache_utils import DynamicCache

import tests.helpers.tiny_qwen_vlms as qwen
from kvpress_mm import CompressionPlan, Compressor, DecodeView, LayerView, ScoredCompressor
from kvpress_mm.errors import InvalidInputError
from kvpress_mm.strategies import BUILTIN_STRATEGIES
from kvpress_mm.wrappers import BUILTIN_WRAPPERS
from tests.helpers import tiny_models
from tests.helpers.tiny_models import hook_count
from tests.helpers.tiny_vlms import IMAGE, build_vlm, make_prompt

NEW_TOKENS = 12
DRAFTS = 3
QWEN_SPECIAL = [qwen.IMAGE, qwen.VIDEO, qwen.VSTART, qwen.VEND]


def _rollback_cases() -> dict[str, tuple[str, dict[str, Any]]]:
    """Every built-in strategy in a configuration that can be rolled back (snapkv with a small window).

    A strategy that evicts while decoding is taken with its eviction turned off where it has the
    option (``h2o``: ``decode_eviction=False``, then it has no decode-time state). Every built-in
    wrapper but ``decoding`` (which evicts while decoding by design) is taken around snapkv.
    """
    cases: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in BUILTIN_STRATEGIES:
        config: dict[str, Any] = {"window_size": 4} if name == "snapkv" else {}
        if Compressor.from_name(name).evicts_while_decoding:
            config["decode_eviction"] = False
            cases[f"{name}-prefill-only"] = (name, config)
        else:
            cases[name] = (name, config)
    # every wrapper that can be rolled back, around snapkv (decoding evicts while decoding: refused below)
    snapkv = {"strategy": "snapkv", "window_size": 4}
    for name in BUILTIN_WRAPPERS:
        if name != "decoding":
            chunking = {"chunk_size": 8} if name == "chunked-prefill" else {}
            cases[f"{name}-snapkv"] = (name, {"inner": snapkv} | chunking)
    return cases


STRATEGIES = _rollback_cases()


def _compressor(case: str, ratio: float = 0.5) -> Compressor:
    name, config = STRATEGIES[case]
    return Compressor.from_name(name, compression_ratio=ratio, **config)


def drafting(assistant: torch.nn.Module, drafts: int = DRAFTS) -> torch.nn.Module:
    """Make ``assistant`` draft exactly ``drafts`` tokens every round (however unsure it is)."""
    config: Any = assistant.generation_config
    config.assistant_confidence_threshold = 0.0
    config.num_assistant_tokens = drafts
    config.num_assistant_tokens_schedule = "constant"
    return assistant


@pytest.fixture
def crops(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The non-zero crops made on any DynamicCache during the test (``-r``: r entries removed)."""
    made: list[int] = []
    original = DynamicCache.crop

    def spy(self: DynamicCache, tokens_to_remove: int) -> Any:
        if tokens_to_remove:
            made.append(int(tokens_to_remove))
        return original(self, tokens_to_remove)

    monkeypatch.setattr(DynamicCache, "crop", spy)
    yield made


# -- models and prompts --------------------------------------------------------------------------


@functools.cache
def _target(kind: str, impl: str = "sdpa") -> torch.nn.Module:
    if kind == "llava":
        return build_vlm("llava", impl, seed=0)
    if kind == "qwen2_vl":
        return qwen.build("qwen2_vl", impl, seed=0)
    return tiny_models.build("llama", impl, seed=0)


def _assistant(kind: str) -> torch.nn.Module:
    """A smaller-vocabulary-compatible drafter of ``kind`` (fresh: tests change its generation config)."""
    if kind == "llava":
        return drafting(build_vlm("llava", seed=1))
    if kind == "qwen2_vl":
        return drafting(qwen.build("qwen2_vl", seed=1))
    return drafting(tiny_models.build("llama", seed=1))


def _inputs(kind: str, layout: str = "one-image") -> dict[str, torch.Tensor]:
    model = _target(kind)
    if kind == "llava":
        return make_prompt("llava", model, 2, seed=0).inputs()
    if kind == "qwen2_vl":
        layouts = {"one-image": qwen.LAYOUTS["one-image"], "ends-with-image": [3, ("image", (4, 6)), 1]}
        return qwen.prompt(model, layouts[layout])
    ids = tiny_models.prompt(24)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **options: Any) -> torch.Tensor:
    if "mm_token_type_ids" in inputs:  # Qwen-VL: never generate a vision special id (a full forward would
        options.setdefault("suppress_tokens", QWEN_SPECIAL)  # read it as a placeholder)
    options = {"max_new_tokens": NEW_TOKENS, "do_sample": False, **options}
    with torch.no_grad():
        out = model.generate(**inputs, **options)  # type: ignore[operator]
    assert isinstance(out, torch.Tensor)
    return out


def _greedy(model: torch.nn.Module, inputs: dict[str, torch.Tensor], compressor: Compressor, **options: Any) -> Any:
    with compressor(model, **options):
        return _generate(model, inputs)


# -- the same tokens as the compressed greedy run ------------------------------------------------


#: every strategy on the vision-language models; two on the text model
MATRIX = [(kind, case) for kind in ("llava", "qwen2_vl") for case in STRATEGIES] + [
    ("llama", "snapkv"),
    ("llama", "h2o-prefill-only"),
]


@pytest.mark.parametrize("drafter", ["assistant", "prompt-lookup"])
@pytest.mark.parametrize(("kind", "case"), MATRIX)
def test_assisted_decoding_gives_the_compressed_greedy_tokens(
    kind: str, case: str, drafter: str, crops: list[int]
) -> None:
    model, inputs, compressor = _target(kind), _inputs(kind), _compressor(case)
    reference = _greedy(model, inputs, compressor)
    assisted = {"assistant_model": _assistant(kind)} if drafter == "assistant" else {"prompt_lookup_num_tokens": 3}
    with compressor(model) as session:
        got = _generate(model, inputs, **assisted)
    if not compressor.is_noop:  # (full never touches the cache: plain transformers)
        assert session.report.layers_compressed == 2
        assert session.report.kv_bytes_after < session.report.kv_bytes_before
    assert torch.equal(got, reference)
    if drafter == "assistant":
        assert crops, "no draft was rejected: the rollback was not exercised"


@pytest.mark.parametrize("variant", ["one-draft", "eager", "dynamic-layers", "text-assistant", "sampling-top-1"])
def test_assisted_decoding_variants(variant: str, crops: list[int]) -> None:
    """One draft per round, eager attention, DynamicLayer caches, a text-only assistant, speculative sampling."""
    impl = "eager" if variant == "eager" else "sdpa"
    model, inputs = _target("llava", impl), _inputs("llava")
    compressor = _compressor("snapkv")
    growing = {"growing_cache": variant != "dynamic-layers"}
    reference = _greedy(model, inputs, compressor, **growing)
    assistant = _assistant("llama") if variant == "text-assistant" else _assistant("llava")
    if variant == "one-draft":
        drafting(assistant, 1)
    # speculative sampling with a one-hot target distribution accepts exactly the greedy tokens
    sampling = {"do_sample": True, "top_k": 1} if variant == "sampling-top-1" else {}
    with compressor(model, **growing):
        got = _generate(model, inputs, assistant_model=assistant, **sampling)
    assert torch.equal(got, reference)
    assert crops


@pytest.mark.parametrize("drafter", ["assistant", "prompt-lookup", "compressed-assistant"])
def test_qwen_prompt_ending_with_an_image(drafter: str) -> None:
    """Verification calls get stale mm_token_type_ids slices (an image's, here): positions decide, not types."""
    model, inputs, compressor = _target("qwen2_vl"), _inputs("qwen2_vl", "ends-with-image"), _compressor("snapkv")
    reference = _greedy(model, inputs, compressor)
    assistant = _assistant("qwen2_vl")
    options = {"prompt_lookup_num_tokens": 3} if drafter == "prompt-lookup" else {"assistant_model": assistant}
    drafter_session = _compressor("streaming")(assistant) if drafter == "compressed-assistant" else None
    with compressor(model):
        if drafter_session is not None:
            with drafter_session:
                got = _generate(model, inputs, **options)
        else:
            got = _generate(model, inputs, **options)
    assert torch.equal(got, reference)


def test_universal_assisted_decoding_with_another_tokenizer(crops: list[int]) -> None:
    """An assistant with another vocabulary: drafts go through text (transformers' UAG)."""
    from tests.helpers.tokenizers import word_level_tokenizer

    model, inputs, compressor = _target("llava"), _inputs("llava"), _compressor("snapkv")
    reference = _greedy(model, inputs, compressor)
    # every target id is a word (so drafts survive the round trip through text); the assistant
    # knows the same words at other ids, and a few more
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 249)]
    target_tokenizer = word_level_tokenizer(words, {f"w{i}": i for i in range(250, 256)}, {})
    assistant_words = ["<pad>", "<s>", "</s>", "x0", "x1", "x2", "x3"] + words[3:]
    extra = {f"w{i}": 250 + i - 246 for i in range(250, 256)}  # w250..w255 at 254..259
    assistant_tokenizer = word_level_tokenizer(assistant_words, extra, {})
    assistant = drafting(tiny_models.build("llama", seed=1, vocab_size=260))
    with compressor(model):
        tokenizers = {"tokenizer": target_tokenizer, "assistant_tokenizer": assistant_tokenizer}
        got = _generate(model, inputs, assistant_model=assistant, **tokenizers)
    assert torch.equal(got, reference)
    assert crops


def test_early_exit_drafts_with_the_compressed_model_itself() -> None:
    """assistant_early_exit: the drafter is the target's first layer, with its own (compressed) cache."""
    model, inputs, compressor = _target("llama"), _inputs("llama"), _compressor("snapkv")
    reference = _greedy(model, inputs, compressor)
    with compressor(model):
        got = _generate(model, inputs, assistant_early_exit=1)
    assert torch.equal(got, reference)


# -- compressed assistants -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "llava", "qwen2_vl"])
@pytest.mark.parametrize("target_compressed", [False, True], ids=["plain-target", "compressed-target"])
def test_a_compressed_assistant_drafts(kind: str, target_compressed: bool, crops: list[int]) -> None:
    """The assistant under its own compressor: generate re-feeds it the whole conversation every round.

    transformers never gives an assistant the images: its image placeholders are embedded as
    text, in plain transformers too; the session accepts them in an assistant's prefill only.
    """
    model, inputs = _target(kind), _inputs(kind)
    target = _compressor("snapkv")
    if target_compressed:
        reference = _greedy(model, inputs, target)
    else:
        reference = _generate(model, inputs)
    assistant = _assistant(kind)
    with _compressor("streaming")(assistant) as drafter_session:
        if target_compressed:
            with target(model):
                got = _generate(model, inputs, assistant_model=assistant)
        else:
            got = _generate(model, inputs, assistant_model=assistant)
    assert drafter_session.report.layers_compressed == 2  # the assistant's prompt was compressed
    assert torch.equal(got, reference)
    assert crops


def test_an_assistant_prefill_without_images_is_accepted_only_from_generate() -> None:
    """A user's call with placeholders and no pixels is still refused (only an assistant's is not)."""
    model, inputs = _target("llava"), _inputs("llava")
    with _compressor("snapkv")(model), pytest.raises(InvalidInputError, match="no pixel_values"), torch.no_grad():
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert bool((inputs["input_ids"] == IMAGE).any())


# -- what cannot work, refused before the first token ----------------------------------------------


def _count_calls(model: torch.nn.Module) -> tuple[list[int], Any]:
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("drafter", ["assistant", "prompt-lookup"])
@pytest.mark.parametrize("kind", ["llava", "llama"])
def test_decode_eviction_is_refused_before_the_first_token(kind: str, drafter: str) -> None:
    model, inputs = _target(kind), _inputs(kind)
    options = {"assistant_model": _assistant(kind)} if drafter == "assistant" else {"prompt_lookup_num_tokens": 3}
    hooks = hook_count(model)
    calls, handle = _count_calls(model)
    try:
        with Compressor.from_name("h2o", compression_ratio=0.5)(model):
            with pytest.raises(InvalidInputError, match="decode_eviction=False") as error:
                _generate(model, inputs, **options)
    finally:
        handle.remove()
    assert calls == []  # nothing ran
    assert "assisted decoding" in str(error.value) and "evicts" in str(error.value)
    assert hook_count(model) == hooks
    # with the option the message names, the same call works
    with Compressor.from_name("h2o", compression_ratio=0.5, decode_eviction=False)(model):
        _generate(model, inputs, **options)


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_the_decoding_wrapper_is_refused_before_the_first_token_naming_its_own_remedy(kind: str) -> None:
    model, inputs = _target(kind), _inputs(kind)
    decoding = Compressor.from_name("decoding", inner="snapkv", compression_ratio=0.5, max_entries=24, interval=4)
    calls, handle = _count_calls(model)
    try:
        with decoding(model):
            with pytest.raises(InvalidInputError, match="without the decoding wrapper") as error:
                _generate(model, inputs, assistant_model=_assistant(kind))
    finally:
        handle.remove()
    assert calls == []
    assert "decode_eviction" not in str(error.value)  # an option decoding does not have


def test_a_compressed_assistant_that_evicts_while_decoding_is_refused_before_the_first_token() -> None:
    model, inputs = _target("llava"), _inputs("llava")
    assistant = _assistant("llava")
    calls, handle = _count_calls(model)
    try:
        with Compressor.from_name("h2o", compression_ratio=0.5)(assistant):
            with pytest.raises(InvalidInputError, match="assistant model .*decode_eviction=False"):
                _generate(model, inputs, assistant_model=assistant)
    finally:
        handle.remove()
    assert calls == []  # the target never ran: its first call comes after the first drafts


def test_a_batch_of_several_rows_gets_transformers_own_refusal() -> None:
    model, inputs = _target("llava"), _inputs("llava")
    batch = {name: torch.cat([value, value]) for name, value in inputs.items()}
    with _compressor("snapkv")(model), pytest.raises(ValueError, match="batch_size = 1") as error:
        _generate(model, batch, assistant_model=_assistant("llava"))
    assert not isinstance(error.value, InvalidInputError)


class _EvictsSometimes(ScoredCompressor):
    """A plugin-like strategy with a decode step: it must declare whether that step evicts."""

    declared: bool = True

    def score(self, layer: LayerView) -> torch.Tensor:
        return -layer.keys.float().norm(dim=-1)

    def decode_plan(self, layer: DecodeView) -> CompressionPlan | None:
        return None

    @property
    def evicts_while_decoding(self) -> bool:
        return self.declared


def test_a_plugin_declares_whether_its_decode_step_evicts() -> None:
    model, inputs = _target("llava"), _inputs("llava")
    assert _EvictsSometimes().acts_while_decoding and _EvictsSometimes().evicts_while_decoding
    with _EvictsSometimes(compression_ratio=0.5)(model), pytest.raises(InvalidInputError) as error:
        _generate(model, inputs, prompt_lookup_num_tokens=3)
    assert "does not evict while decoding (evicts_while_decoding is False)" in str(error.value)
    compressor = _EvictsSometimes(compression_ratio=0.5, declared=False)
    reference = _greedy(model, inputs, compressor)
    with compressor(model):
        assert torch.equal(_generate(model, inputs, assistant_model=_assistant("llava")), reference)
