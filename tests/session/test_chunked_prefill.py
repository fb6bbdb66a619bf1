"""The session's chunked prefill against a naive reference that runs the chunks itself.

The strategies here are built-in ones given a ``prefill_chunk_size`` by a test-only subclass
(tests/helpers/replan.py), so that the session's mechanism is tested without the
``chunked-prefill`` wrapper. The reference (tests/helpers/chunked_reference.py) never uses a
cache: per chunk, one masked no-cache forward over the whole prompt, its own kept columns and
its own carried attention. Compared: each layer's kept prompt columns after the prefill, the
logits of the prompt's last position, and the decode steps' logits (a masked forward over prompt
and generated tokens), on text models, LLaVA, LLaVA-NeXT and the Qwen-VL family (multimodal RoPE
positions of the whole prompt, Qwen3-VL's deepstack features split by chunk), left-padded batches.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvpress_mm import Compressor
from kvpress_mm.errors import InvalidInputError
from tests.helpers import tiny_qwen_vlms as tq
from tests.helpers import tiny_vlms as tv
from tests.helpers.chunked_reference import (
    budget,
    chunked_prefill_reference,
    decode_visibility,
    kept_columns,
    modality_from_ids,
)
from tests.helpers.masked_reference import PlanRecorder, cache_of, masked_logits
from tests.helpers.replan import chunked
from tests.helpers.tiny_models import FAMILIES, build, generate, left_padded

ATOL = 1e-4
NEW_TOKENS = 3
RATIO = 0.5
CHUNK = 7

INNERS: list[tuple[str, dict[str, Any]]] = [
    ("snapkv", {"window_size": 4}),
    ("h2o", {"decode_eviction": False}),  # accumulated attention carried across chunks
    ("streaming", {"sink_tokens": 2}),
    ("lookm-evict", {}),
    ("tova", {}),
    ("knorm", {}),
]


def _ids(case: tuple[str, dict[str, Any]]) -> str:
    name, config = case
    return name + "".join(f"-{k}={v}" for k, v in config.items())


def _check(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    inner: Compressor,
    run: Any,
    *,
    image_id: int = -1,
    video_id: int = -1,
    prompt_extra: dict[str, Any] | None = None,
    full_extra: dict[str, Any] | None = None,
    explicit_positions: bool = True,
    chunk: int = CHUNK,
) -> None:
    """Generate under the chunked strategy; compare kept columns and logits with the reference."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    width = int(ids.shape[1])
    recorder = PlanRecorder()
    with recorder.recording(), chunked(inner, chunk)(model) as session:
        out = run(model, inputs, max_new_tokens=NEW_TOKENS)
    plans = recorder.per_layer(cache_of(out))
    reference = chunked_prefill_reference(
        model,
        ids,
        mask,
        modality_from_ids(ids, mask, image_id, video_id),
        inner,
        chunk,
        RATIO,
        prompt_extra,
        explicit_positions,
    )
    assert sorted(plans) == sorted(reference.kept)
    for layer, layer_plans in plans.items():
        assert len(layer_plans) == -(-width // chunk), "one plan per chunk"
        assert torch.equal(kept_columns(layer_plans, chunk, width), reference.kept[layer]), f"layer {layer}"
        # no layer ever held more than its budget after the previous chunk plus one chunk
        assert max(p.length_before for p in layer_plans) == reference.peak_entries[layer]
    real = [int(n) for n in mask.sum(-1).tolist()]
    assert session.report.n_keep == tuple(budget(n, RATIO) for n in real)
    torch.testing.assert_close(out.logits[0], reference.logits[:, -1], atol=ATOL, rtol=0)
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], NEW_TOKENS, dtype=mask.dtype)], dim=1)
    decode = masked_logits(
        model, out.sequences, full_mask, decode_visibility(reference, full_mask, width), full_extra, explicit_positions
    )
    for step in range(NEW_TOKENS):
        torch.testing.assert_close(out.logits[step], decode[:, width - 1 + step], atol=ATOL, rtol=0)


def _text_run(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    return generate(model, inputs["input_ids"], inputs["attention_mask"], **kwargs)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("case", INNERS, ids=_ids)
def test_text_model_batch_equals_the_chunked_reference(case: tuple[str, dict[str, Any]], impl: str) -> None:
    name, config = case
    model = build("llama", impl, seed=1)
    ids, mask, _ = left_padded([30, 12, 23], seed=3)  # the second row is all padding in the first chunk
    _check(
        model,
        {"input_ids": ids, "attention_mask": mask},
        Compressor.from_name(name, compression_ratio=RATIO, **config),
        _text_run,
    )


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_other_text_families_equal_the_chunked_reference(family: str) -> None:
    model = build(family, "sdpa", seed=2)
    ids, mask, _ = left_padded([25, 18], seed=4)
    inner = Compressor.from_name("snapkv", compression_ratio=RATIO, window_size=3)
    _check(model, {"input_ids": ids, "attention_mask": mask}, inner, _text_run)


@pytest.mark.parametrize("family", tv.FAMILIES)
@pytest.mark.parametrize("case", INNERS[:2], ids=_ids)
def test_llava_family_and_internvl_batches_equal_the_chunked_reference(
    family: str, case: tuple[str, dict[str, Any]]
) -> None:
    name, config = case
    model = tv.build_vlm(family)
    prompts = [tv.make_prompt(family, model, 2, seed=1), tv.make_prompt(family, model, 1, seed=2)]
    ids, mask, pixels = tv.left_pad_batch(family, prompts)
    inputs = {"input_ids": ids, "attention_mask": mask, **pixels}
    inner = Compressor.from_name(name, compression_ratio=RATIO, **config)
    image = int(model.config.image_token_id)
    _check(model, inputs, inner, tv.generate_vlm, image_id=image, prompt_extra=pixels, full_extra=pixels)


@pytest.mark.parametrize("kind", tq.KINDS)
@pytest.mark.parametrize("case", INNERS[:2], ids=_ids)
def test_qwen_vl_batch_equals_the_chunked_reference_with_positions_of_the_whole_prompt(
    kind: str, case: tuple[str, dict[str, Any]]
) -> None:
    name, config = case
    model = tq.build(kind)
    inputs = tq.batch(
        [
            tq.prompt(model, [5, ("image", (4, 6)), 7, ("image", (4, 4)), 6], seed=2),
            tq.prompt(model, [3, ("image", (4, 4)), 9], seed=3),
        ]
    )
    inner = Compressor.from_name(name, compression_ratio=RATIO, **config)
    width = int(inputs["input_ids"].shape[1])
    prompt_extra = {**tq.media(inputs), "mm_token_type_ids": inputs["mm_token_type_ids"]}
    _check(
        model,
        inputs,
        inner,
        tq.generate,
        image_id=int(model.config.image_token_id),
        video_id=int(model.config.video_token_id),
        prompt_extra=prompt_extra,
        full_extra=tq.reference_inputs(inputs, width + NEW_TOKENS),
        explicit_positions=False,  # the model computes M-RoPE from the whole sequence
    )


def test_a_prompt_within_one_chunk_is_the_one_shot_strategy() -> None:
    model = build("llama", "sdpa", seed=3)
    ids, mask, _ = left_padded([20, 14], seed=5)
    inner = Compressor.from_name("h2o", compression_ratio=RATIO)
    with inner(model):
        one_shot = generate(model, ids, mask, max_new_tokens=4)
    with chunked(inner, 20)(model):
        single = generate(model, ids, mask, max_new_tokens=4)
    assert torch.equal(single.sequences, one_shot.sequences)
    for a, b in zip(cache_of(single).layers, cache_of(one_shot).layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_plain_forward_returns_the_logits_of_every_position() -> None:
    model = build("llama", "sdpa", seed=4)
    ids, mask, _ = left_padded([26, 17], seed=6)
    inner = Compressor.from_name("snapkv", compression_ratio=RATIO, window_size=4)
    reference = chunked_prefill_reference(model, ids, mask, modality_from_ids(ids, mask, -1), inner, CHUNK, RATIO)
    with torch.no_grad(), chunked(inner, CHUNK)(model):
        logits = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], reference.logits[real], atol=ATOL, rtol=0)


def test_peak_kv_bytes_are_bounded_by_the_budget_plus_one_chunk() -> None:
    model = build("llama", "sdpa", seed=5)
    ids, mask, _ = left_padded([120], seed=7)
    inner = Compressor.from_name("snapkv", compression_ratio=0.75, window_size=4)
    with inner(model) as one_shot:
        generate(model, ids, mask, max_new_tokens=1)
    with chunked(inner, 16)(model) as session:
        generate(model, ids, mask, max_new_tokens=1)
    layers = len(model.get_decoder().layers)
    per_entry = session.report.kv_bytes_after // (layers * session.report.n_keep[0])
    # every layer holds at most the final budget; the layer that attends holds one chunk more
    assert session.report.kv_bytes_peak <= per_entry * (layers * 30 + 16)
    assert one_shot.report.kv_bytes_peak >= per_entry * 120
    assert session.report.kv_bytes_after == one_shot.report.kv_bytes_after
    assert session.report.kv_bytes_before == one_shot.report.kv_bytes_before


def test_output_hidden_states_are_refused_and_the_model_is_restored() -> None:
    model = build("llama", "sdpa", seed=6)
    ids, mask, _ = left_padded([20], seed=8)
    decoder = model.get_decoder()
    inner = chunked(Compressor.from_name("snapkv", compression_ratio=RATIO), 8)
    with pytest.raises(InvalidInputError, match="output_hidden_states"), inner(model):
        assert "forward" in vars(decoder)
        model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert "forward" not in vars(decoder)
    with inner(model):
        out = model(input_ids=ids, attention_mask=mask)  # the session still works after the refusal
    assert out.logits.shape[:2] == ids.shape


def test_transformers_own_prefill_chunks_stay_refused() -> None:
    model = build("llama", "sdpa", seed=7)
    ids, mask, _ = left_padded([20], seed=9)
    with (
        pytest.raises(InvalidInputError, match="prefill_chunk_size.*chunked-prefill wrapper"),
        chunked(Compressor.from_name("snapkv", compression_ratio=RATIO), 8)(model),
    ):
        generate(model, ids, mask, max_new_tokens=2, prefill_chunk_size=8)


def test_sliding_window_layers_go_chunk_by_chunk_uncompressed() -> None:
    window = 8
    model = build(
        "qwen2",
        "sdpa",
        seed=8,
        use_sliding_window=True,
        sliding_window=window,
        layer_types=["full_attention", "sliding_attention"],
    )
    ids, mask, _ = left_padded([24], seed=10)
    inner = Compressor.from_name("snapkv", compression_ratio=RATIO, window_size=4)
    recorder = PlanRecorder()
    with (
        pytest.warns(UserWarning, match="sliding-window"),
        recorder.recording(),
        chunked(inner, CHUNK)(model) as session,
    ):
        out = generate(model, ids, mask, max_new_tokens=1)
    assert (session.report.layers_compressed, session.report.layers_skipped) == (1, 1)
    assert type(cache_of(out).layers[1]).__name__ == "DynamicSlidingWindowLayer"
    reference = chunked_prefill_reference(
        model, ids, mask, modality_from_ids(ids, mask, -1), inner, CHUNK, RATIO, sliding={1: window}
    )
    assert torch.equal(kept_columns(recorder.per_layer(cache_of(out))[0], CHUNK, 24), reference.kept[0])
    torch.testing.assert_close(out.logits[0], reference.logits[:, -1], atol=ATOL, rtol=0)
