"""Every way a transformers user drives generate, on a tiny LLaVA and a tiny Qwen2-VL under a compressor.

The compressor must be invisible except for the memory it saves. Each path is compared with
the run it must equal: the uncompressed run where compression cannot change anything (ratio 0,
a strategy that never touches the cache, is exactly plain transformers), else the plain
compressed greedy run - sampling that keeps only the top token, assisted decoding and the
streamer must give its tokens; a continuation by new tokens, by the whole history and on a fork
must agree. A quantized cache is compressed and stays quantized; a static cache must raise a
clear error before the first token.

``pipeline("image-text-to-text")`` is driven on LLaVA only: a Qwen2-VL processor cannot be built
without torchvision's video processor, which this CPU environment cannot import.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import tests.helpers.tiny_qwen_vlms as qwen
from kvpress_mm import Compressor, fork_cache
from kvpress_mm.errors import UnsupportedCacheError
from tests.helpers.tiny_vlms import IMAGE, build_vlm, make_prompt
from tests.helpers.tokenizers import word_level_tokenizer

KINDS = ["llava", "qwen2_vl"]
NEW_TOKENS = 6
SPECIAL = {"<image>": IMAGE, "<video>": 251, "<vision_start>": 252, "<vision_end>": 253}
#: never generated on Qwen-VL: a generated vision id would be read as a placeholder by a later full forward
QWEN_SUPPRESSED = [qwen.IMAGE, qwen.VIDEO, qwen.VSTART, qwen.VEND]


@functools.cache
def _model(kind: str) -> torch.nn.Module:
    return build_vlm("llava", seed=0) if kind == "llava" else qwen.build("qwen2_vl", seed=0)


@functools.cache
def _tokenizer() -> Any:
    """A word for every id of the tiny vocabulary (256), so that any generated token decodes to text."""
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 249)]
    return word_level_tokenizer(words, SPECIAL, {"image_token": "<image>"})


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    if kind == "llava":
        return make_prompt("llava", _model(kind), 2, seed=0).inputs()
    return qwen.prompt(_model(kind), qwen.LAYOUTS["three-images"], seed=2)


def _compressor(ratio: float = 0.5) -> Compressor:
    return Compressor.from_name("snapkv", compression_ratio=ratio, window_size=4)


def _generate(kind: str, inputs: dict[str, torch.Tensor] | None = None, **options: Any) -> Any:
    model = _model(kind)
    options = {"max_new_tokens": NEW_TOKENS, "do_sample": False, **options}
    if kind == "qwen2_vl":
        options.setdefault("suppress_tokens", QWEN_SUPPRESSED)
    with torch.no_grad():
        return model.generate(**(inputs if inputs is not None else _inputs(kind)), **options)  # type: ignore[operator]


def _compressed_greedy(kind: str) -> torch.Tensor:
    with _compressor()(_model(kind)) as session:
        out = _generate(kind)
    assert session.report.kv_bytes_after < session.report.kv_bytes_before  # it really compressed
    return out


def _new_tokens(kind: str, sequences: torch.Tensor) -> torch.Tensor:
    return sequences[:, _inputs(kind)["input_ids"].shape[1] :]


# -- decoding strategies ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_sampling_and_beams_are_plain_transformers_at_ratio_zero(kind: str) -> None:
    """A compressor that removes nothing is exactly plain transformers, for every decoding strategy."""
    runs = {
        "greedy": {},
        "sampling": {"do_sample": True, "num_return_sequences": 2, "top_k": 50},
        "beams": {"num_beams": 2, "num_return_sequences": 2},
    }
    for name, options in runs.items():
        torch.manual_seed(0)
        want = _generate(kind, **options)
        torch.manual_seed(0)
        with _compressor(0.0)(_model(kind)):
            got = _generate(kind, **options)
        assert torch.equal(got, want), name


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_with_several_sequences_on_a_compressed_cache(kind: str) -> None:
    greedy = _compressed_greedy(kind)
    with _compressor()(_model(kind)):
        # sampling restricted to the top token: every sequence is the greedy one
        top = _generate(kind, do_sample=True, top_k=1, num_return_sequences=3)
        torch.manual_seed(0)
        sampled = _generate(kind, do_sample=True, num_return_sequences=2)
    assert all(torch.equal(row, greedy[0]) for row in top)
    assert sampled.shape == (2, greedy.shape[1])


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_on_a_compressed_cache(kind: str) -> None:
    greedy = _compressed_greedy(kind)
    with _compressor()(_model(kind)):
        one_beam = _generate(kind, num_beams=1)
        beams = _generate(kind, num_beams=3, num_return_sequences=2, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(one_beam, greedy)
    assert beams.sequences.shape == (2, greedy.shape[1])
    assert float(beams.sequences_scores[0]) >= float(beams.sequences_scores[1])


def test_a_batch_with_several_sequences_each_gets_its_rows_tokens() -> None:
    """LLaVA, two left-padded prompts, three samples each (top token only): each row's greedy tokens."""
    from tests.helpers.tiny_vlms import left_pad_batch

    model = _model("llava")
    prompts = [make_prompt("llava", model, n, seed=n) for n in (1, 2)]
    ids, mask, pixels = left_pad_batch("llava", prompts)
    with _compressor()(model):
        alone = [_generate("llava", p.inputs())[0, -NEW_TOKENS:] for p in prompts]
        batch = {"input_ids": ids, "attention_mask": mask, **pixels}
        got = _generate("llava", batch, do_sample=True, top_k=1, num_return_sequences=3)
    for row, sequence in enumerate(got[:, -NEW_TOKENS:]):
        assert torch.equal(sequence, alone[row // 3])


# -- pipeline and streamer ---------------------------------------------------------------------------


def _llava_processor() -> Any:
    import transformers as tf
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    options = dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return tf.LlavaProcessor(image_processor=image_processor, tokenizer=_tokenizer(), image_token="<image>", **options)


def test_pipeline_image_text_to_text() -> None:
    from transformers import pipeline

    model, processor = _model("llava"), _llava_processor()
    image = Image.fromarray((np.random.RandomState(0).rand(30, 40, 3) * 255).astype("uint8"))
    text = "w11 <image> w12 w13 w14 w15 w16 w17 w18"
    generation = {"max_new_tokens": NEW_TOKENS, "do_sample": False}
    inputs = processor(images=image, text=text, return_tensors="pt")
    with _compressor()(model) as session:
        pipe = pipeline("image-text-to-text", model=model, processor=processor)
        answer = pipe(images=image, text=text, return_full_text=False, generate_kwargs=generation)
        assert session.report.kv_bytes_after < session.report.kv_bytes_before
        with torch.no_grad():
            tokens = model.generate(**inputs, **generation)[0, inputs["input_ids"].shape[1] :]  # type: ignore[operator]
    assert answer[0]["generated_text"].strip() == _tokenizer().decode(tokens, skip_special_tokens=True).strip()
    assert len(tokens) == NEW_TOKENS


@pytest.mark.parametrize("kind", KINDS)
def test_text_iterator_streamer_in_a_thread(kind: str) -> None:
    from transformers import TextIteratorStreamer

    greedy = _compressed_greedy(kind)
    streamer = TextIteratorStreamer(_tokenizer(), skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _generate(kind, streamer=streamer)
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)
            streamer.end()

    with _compressor()(_model(kind)):  # the session's hooks are the model's: generate in any thread is covered
        worker = threading.Thread(target=run)
        worker.start()
        streamed = "".join(streamer)
        worker.join()
    assert not errors
    expected = _tokenizer().decode(_new_tokens(kind, greedy)[0], skip_special_tokens=True)
    assert streamed.split() == expected.split() and len(expected.split()) == NEW_TOKENS


# -- assisted decoding and continuation --------------------------------------------------------------


@pytest.mark.parametrize("drafter", ["assistant", "prompt-lookup"])
@pytest.mark.parametrize("kind", KINDS)
def test_assisted_decoding(kind: str, drafter: str) -> None:
    greedy = _compressed_greedy(kind)
    if drafter == "assistant":
        assistant: Any = build_vlm("llava", seed=1) if kind == "llava" else qwen.build("qwen2_vl", seed=1)
        assistant.generation_config.assistant_confidence_threshold = 0.0  # draft 3 tokens every round
        assistant.generation_config.num_assistant_tokens = 3
        options: dict[str, Any] = {"assistant_model": assistant}
    else:
        options = {"prompt_lookup_num_tokens": 3}
    with _compressor()(_model(kind)):
        got = _generate(kind, **options)
    assert torch.equal(got, greedy)


@pytest.mark.parametrize("kind", KINDS)
def test_continuation_by_new_tokens_whole_history_and_fork(kind: str) -> None:
    """A second turn on the compressed cache: new tokens, the whole history, or on a fork - the same answer."""
    extra = torch.randint(3, 240, (1, 4), generator=torch.Generator().manual_seed(9))
    answers = {}
    for how in ("new-tokens", "whole-history", "fork"):
        with _compressor()(_model(kind)):
            first = _generate(kind, return_dict_in_generate=True)
            history = torch.cat([first.sequences, extra], dim=1)
            mask = torch.ones_like(history)
            cache = fork_cache(first.cache) if how == "fork" else first.cache
            ids = history if how == "whole-history" else history[:, -(extra.shape[1] + 1) :]
            answers[how] = _generate(kind, {"input_ids": ids, "attention_mask": mask}, cache=cache)[:, -NEW_TOKENS:]
    assert torch.equal(answers["new-tokens"], answers["whole-history"])
    assert torch.equal(answers["new-tokens"], answers["fork"])


# -- unsupported caches: a clear error before the first token -----------------------------------------


def _count_lm_head_calls(model: torch.nn.Module) -> tuple[list[int], Any]:
    calls: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))  # type: ignore[operator]
    return calls, handle


@pytest.mark.parametrize("kind", KINDS)
def test_a_static_cache_is_refused_clearly(kind: str) -> None:
    plain = _generate(kind, cache_implementation="static")  # works without compression
    assert plain.shape[1] == _inputs(kind)["input_ids"].shape[1] + NEW_TOKENS
    calls, handle = _count_lm_head_calls(_model(kind))
    try:
        with _compressor()(_model(kind)), pytest.raises(UnsupportedCacheError, match=r"cache=DynamicCache") as error:
            _generate(kind, cache_implementation="static")
    finally:
        handle.remove()
    assert "StaticLayer" in str(error.value) and calls == []  # no token was produced


# Quantized caches work under compression (tests/session/test_quantized_caches.py checks them
# exactly): here, as a user drives them, with the fp8 backend (no optional package needed).
@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_cache_is_compressed_and_stays_quantized(kind: str) -> None:
    from transformers.cache_utils import QuantizedCache

    quantized = {
        "cache_implementation": "quantized",
        "cache_config": {"backend": "fp8"},
        "return_dict_in_generate": True,
    }
    plain = _generate(kind, **quantized)
    with _compressor(0.0)(_model(kind)):
        noop = _generate(kind, **quantized)
    assert torch.equal(noop.sequences, plain.sequences)  # ratio 0: exactly plain transformers
    with _compressor()(_model(kind)) as session:
        out = _generate(kind, **quantized)
    assert isinstance(out.cache, QuantizedCache)
    assert session.report.kv_bytes_after < session.report.kv_bytes_before
    with _compressor()(_model(kind)) as dynamic:
        _generate(kind)
    assert session.report.n_keep == dynamic.report.n_keep  # the same budgets as on a DynamicCache
    assert out.sequences.shape == plain.sequences.shape
