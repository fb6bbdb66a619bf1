"""Qwen-VL inputs: the modality map, clear errors for inputs that would go wrong, building prompts.

Covers the adapter's modality map (from ``mm_token_type_ids`` or the placeholder ids; vision
delimiters are text; no tokens-per-image assumed), the input checks (missing or inconsistent
``mm_token_type_ids``, placeholder counts that do not match the grids), the model left as found
after every error, and :func:`expand_vision_placeholders` with the PIL image processor on real
PNG files and a model saved to and loaded from a local directory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpress_mm import Compressor
from kvpress_mm.adapters.qwen2_5_vl import Qwen25VLAdapter
from kvpress_mm.adapters.qwen2_vl import Qwen2VLAdapter, expand_vision_placeholders
from kvpress_mm.adapters.qwen3_vl import Qwen3VLAdapter
from kvpress_mm.errors import InvalidInputError
from kvpress_mm.modality import Modality
from kvpress_mm.registry import find_adapter
from tests.helpers.masked_reference import (
    PlanRecorder,
    cache_of,
    compressed_visibility,
    decode_step_logits,
    masked_logits,
)
from tests.helpers.tiny_models import assert_same_model_state, hook_count, model_snapshot
from tests.helpers.tiny_qwen_vlms import (
    BOS,
    IMAGE,
    KINDS,
    LAYOUTS,
    PAD,
    VEND,
    VIDEO,
    VSTART,
    batch,
    build,
    generate,
    media,
    prompt,
    real_length,
    reference_inputs,
)

ADAPTERS = {"qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen25VLAdapter, "qwen3_vl": Qwen3VLAdapter}


@functools.cache
def _model(kind: str, impl: str = "sdpa") -> torch.nn.Module:
    return build(kind, impl, seed=20 + KINDS.index(kind))


# -- the modality map -------------------------------------------------------------------------------


def _expected_map(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Independently: image/video exactly at the placeholder ids, padding from the mask, text elsewhere."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    expected = torch.full(ids.shape, int(Modality.TEXT), dtype=torch.int8)
    expected[ids == IMAGE] = int(Modality.IMAGE)
    expected[ids == VIDEO] = int(Modality.VIDEO)
    expected[mask == 0] = int(Modality.PADDING)
    return expected


@pytest.mark.parametrize("kind", KINDS)
def test_modality_map_from_the_models_inputs(kind: str) -> None:
    model = _model(kind)
    adapter = find_adapter(model)
    assert isinstance(adapter, ADAPTERS[kind])
    layout = [4, ("image", (4, 6)), 3, ("video", (2, 2, 4)), 2, ("image", (2, 2)), 5]
    inputs = batch([prompt(model, layout, seed=1), prompt(model, LAYOUTS["one-image"], seed=2)])
    width = inputs["input_ids"].shape[1]
    expected = _expected_map(inputs)
    assert adapter.modality_map(model, inputs, width).tolist() == expected.tolist()
    # without mm_token_type_ids: the placeholder ids
    no_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    assert adapter.modality_map(model, no_types, width).tolist() == expected.tolist()
    # delimiters are text; no tokens-per-image count: the image runs are as long as the model's features
    ids = inputs["input_ids"][0]
    assert bool((expected[0][(ids == VSTART) | (ids == VEND)] == Modality.TEXT).all())
    image_features = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], return_dict=True
    ).pooler_output
    runs = [len(r) for r in "".join("i" if m == Modality.IMAGE else " " for m in expected[0].tolist()).split()]
    assert runs == [int(f.shape[0]) for f in image_features[:2]] == [6, 1]
    # mm_token_type_ids are what the map reads when given (here: told the video is text)
    relabelled = dict(
        inputs, mm_token_type_ids=inputs["mm_token_type_ids"].masked_fill(inputs["input_ids"] == VIDEO, 0)
    )
    assert not bool((adapter.modality_map(model, relabelled, width) == Modality.VIDEO).any())


@pytest.mark.parametrize("kind", KINDS)
def test_compressed_runs_report_the_modality_of_kept_entries(kind: str) -> None:
    """End to end: the strategies see this map (LOOK-M keeps text first)."""
    model = _model(kind, "eager")
    inputs = prompt(model, LAYOUTS["three-images"], seed=3)
    (length,) = real_length(inputs)
    recorder = PlanRecorder()
    with recorder.recording(), Compressor.from_name("lookm-evict", compression_ratio=0.6, window_size=2)(model):
        out = generate(model, inputs, max_new_tokens=2)
    is_image = inputs["mm_token_type_ids"][0] == 1
    n_text_outside = int((~is_image[: length - 2]).sum())
    n_keep = int(length * 0.4)
    assert n_keep - 2 < n_text_outside
    for layer_plans in recorder.per_layer(cache_of(out)).values():
        assert not bool(is_image[layer_plans[0].kept_indices].any()), "the budget is spent on text first"


# -- clear errors, model left as found ------------------------------------------------------------------


def _drop_one_placeholder(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = inputs["input_ids"]
    at = int((ids[0] == IMAGE).nonzero()[0, 0])
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[at] = False
    new = {k: v[:, keep] for k, v in inputs.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return {**inputs, **new}


def _extra_placeholder(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = inputs["input_ids"]
    at = int((ids[0] == IMAGE).nonzero()[0, 0])
    new = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        value = inputs[key]
        new[key] = torch.cat([value[:, : at + 1], value[:, at : at + 1], value[:, at + 1 :]], dim=1)
    return {**inputs, **new}


def _merge_two_images(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two images' placeholders in one run (the text between them removed): the counts add up, the runs do not."""
    ids = inputs["input_ids"][0]
    end = int((ids == VEND).nonzero()[0, 0])
    start = int((ids == VSTART).nonzero()[1, 0])
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[end : start + 1] = False
    return {**inputs, **{k: inputs[k][:, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}}


def _grid_of_another_image(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    grid = inputs["image_grid_thw"].clone()
    grid[0] = torch.tensor([1, 2, 12])  # same number of patches (24), other shape: still 6 tokens
    grid[1] = torch.tensor([1, 4, 4])  # 16 patches instead of 8
    return {**inputs, "image_grid_thw": grid}


def _types_mark_text(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    types = inputs["mm_token_type_ids"].clone()
    types[0, 1] = 1  # a text token marked as image
    return {**inputs, "mm_token_type_ids": types}


def _types_miss_image(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    types = inputs["mm_token_type_ids"].clone()
    types[inputs["input_ids"] == IMAGE] = 0  # the image is declared text: M-RoPE would treat it as text
    return {**inputs, "mm_token_type_ids": types}


def _types_say_video(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    types = inputs["mm_token_type_ids"].clone()
    types[types == 1] = 2
    return {**inputs, "mm_token_type_ids": types}


def _no_types(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}


def _missing_pixels(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**inputs, "pixel_values": inputs["pixel_values"][:-4]}


def _orphan_placeholders(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}


BAD_INPUTS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], str]] = {
    "no-mm-token-type-ids": (_no_types, r"without mm_token_type_ids.*expand_vision_placeholders"),
    "one-placeholder-missing": (_drop_one_placeholder, r"t\*h\*w/merge_size\^2"),
    "one-placeholder-too-many": (_extra_placeholder, r"t\*h\*w/merge_size\^2"),
    "two-images-in-one-run": (_merge_two_images, r"runs of \[6, 2, 9\].*runs of \[\[8, 9\]\]"),
    "grids-of-other-images": (_grid_of_another_image, r"patches|placeholder runs"),
    "types-mark-a-text-token": (_types_mark_text, "disagree with input_ids"),
    "types-miss-the-image": (_types_miss_image, "disagree with input_ids"),
    "types-say-video": (_types_say_video, "disagree with input_ids"),
    "pixels-missing-patches": (_missing_pixels, r"patches but image_grid_thw"),
    "placeholders-without-pixels": (_orphan_placeholders, "no pixel_values"),
}


@pytest.mark.parametrize("call", ["generate", "forward"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_raise_clearly_and_leave_the_model_as_found(kind: str, case: str, call: str) -> None:
    model = _model(kind)
    good = prompt(model, LAYOUTS["three-images"], seed=4)
    corrupt, message = BAD_INPUTS[case]
    bad = corrupt(good)
    before = model_snapshot(model)
    reference = generate(model, good, max_new_tokens=3)
    with Compressor.from_name("snapkv", compression_ratio=0.5)(model):
        assert "get_rope_index" in vars(model.model), "the session checks inputs where transformers computes M-RoPE"
        with pytest.raises(InvalidInputError, match=message), torch.no_grad():
            if call == "generate":
                generate(model, bad, max_new_tokens=3)
            else:
                model(**bad)
        # the session still works after the refused call
        out = generate(model, good, max_new_tokens=3)
        assert cache_of(out).layers[0].keys.shape[-2] == int(real_length(good)[0] * 0.5) + 2
    assert hook_count(model) == 0 and "get_rope_index" not in vars(model.model)
    assert_same_model_state(before, model_snapshot(model))
    after = generate(model, good, max_new_tokens=3)
    assert torch.equal(after.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, reference.logits, strict=True))


def test_video_placeholder_count_mismatch_raises() -> None:
    model = _model("qwen2_vl")
    inputs = prompt(model, LAYOUTS["video"], seed=5)
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[int((inputs["input_ids"][0] == VIDEO).nonzero()[0, 0])] = False
    bad = {**inputs, **{k: inputs[k][:, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}}
    with Compressor.from_name("h2o", compression_ratio=0.5)(model):
        with pytest.raises(InvalidInputError, match=r"video_grid_thw \[\[2, 4, 4\]\].*runs of \[\[7\]\]"):
            generate(model, bad, max_new_tokens=2)
        with pytest.raises(InvalidInputError, match="without mm_token_type_ids"):
            generate(model, _no_types(inputs), max_new_tokens=2)
    assert "get_rope_index" not in vars(model.model)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_mm_token_type_ids_would_be_silently_wrong(kind: str) -> None:
    """Why the check exists: transformers' generate runs without them, with other M-RoPE positions."""
    model = _model(kind)
    inputs = prompt(model, LAYOUTS["one-image"], seed=6)
    right = generate(model, inputs, max_new_tokens=3)
    silent = generate(model, _no_types(inputs), max_new_tokens=3)  # no error from transformers
    assert (torch.stack(right.logits) - torch.stack(silent.logits)).abs().max().item() > 1e-3


def test_noop_strategies_leave_inputs_to_transformers() -> None:
    model = _model("qwen2_vl")
    inputs = prompt(model, LAYOUTS["one-image"], seed=7)
    reference = generate(model, _no_types(inputs), max_new_tokens=3)
    with Compressor.from_name("full")(model):
        assert "get_rope_index" not in vars(model.model)
        out = generate(model, _no_types(inputs), max_new_tokens=3)
    assert torch.equal(out.sequences, reference.sequences)


# -- expand_vision_placeholders -------------------------------------------------------------------------


def _placeholders(inputs: dict[str, torch.Tensor]) -> list[int]:
    """The prompt with each image / video run collapsed back to one placeholder (Qwen3-VL frames too)."""
    ids: list[int] = []
    for token in inputs["input_ids"][0].tolist():
        if token in (IMAGE, VIDEO) and ids and ids[-1] == token:
            continue
        ids.append(token)
    collapsed: list[int] = []
    for token in ids:  # Qwen3-VL: <vs> <vs> v <ve> <vs> v <ve> <ve> -> <vs> v <ve>
        collapsed.append(token)
        if collapsed[-4:] == [VIDEO, VEND, VSTART, VIDEO]:
            del collapsed[-3:]
        if collapsed[-3:] == [VSTART, VSTART, VIDEO]:
            del collapsed[-3]
        if collapsed[-3:] == [VIDEO, VEND, VEND]:
            del collapsed[-1]
    return collapsed


@pytest.mark.parametrize("kind", KINDS)
def test_expand_vision_placeholders_matches_hand_built_prompts(kind: str) -> None:
    model = _model(kind)
    layout = [3, ("image", (4, 6)), 2, ("video", (2, 4, 4)), 1, ("image", (6, 2)), 4]
    inputs = prompt(model, layout, seed=8)
    short = _placeholders(inputs)
    assert short.count(IMAGE) == 2 and short.count(VIDEO) == 1
    built = expand_vision_placeholders(short, inputs["image_grid_thw"], inputs["video_grid_thw"], model.config)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert torch.equal(built[key], inputs[key]), key
    # the same from a model, a tensor and plain lists
    grids = (inputs["image_grid_thw"].tolist(), inputs["video_grid_thw"].tolist())
    again = expand_vision_placeholders(torch.tensor(short), *grids, model)
    assert torch.equal(again["input_ids"], inputs["input_ids"])


def test_expand_vision_placeholders_batches_left_padded() -> None:
    model = _model("qwen2_vl")
    rows = [[BOS, 5, VSTART, IMAGE, VEND, 6], [BOS, VSTART, IMAGE, VEND, 7, VSTART, IMAGE, VEND]]
    grid = [[1, 2, 2], [1, 4, 6], [1, 2, 4]]  # 1, 6 and 2 tokens, the first in row 0
    out = expand_vision_placeholders(rows, grid, None, model.config)
    assert out["input_ids"].tolist() == [
        [PAD] * 8 + [BOS, 5, VSTART, IMAGE, VEND, 6],
        [BOS, VSTART, *[IMAGE] * 6, VEND, 7, VSTART, IMAGE, IMAGE, VEND],
    ]
    assert out["attention_mask"].tolist() == [[0] * 8 + [1] * 6, [1] * 14]
    assert out["mm_token_type_ids"].tolist() == (out["input_ids"] == IMAGE).long().tolist()
    # a padded 2-D tensor with its mask: the padding is dropped before expanding
    padded = torch.tensor([[PAD, PAD, BOS, VSTART, IMAGE, VEND]])
    again = expand_vision_placeholders(padded, [[1, 2, 2]], None, model.config, attention_mask=(padded != PAD).long())
    assert again["input_ids"].tolist() == [[BOS, VSTART, IMAGE, VEND]]
    with pytest.raises(ValueError, match="3 image placeholder"):
        expand_vision_placeholders(rows, grid[:2], None, model.config)
    with pytest.raises(ValueError, match="merge_size 2"):
        expand_vision_placeholders([BOS, IMAGE], [[1, 3, 4]], None, model.config)


# -- the PIL image processor on real images, a model saved to and loaded from disk ----------------------


@pytest.mark.parametrize("kind", KINDS)
def test_pil_image_processor_local_model_and_compressed_generate(kind: str, tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessorPil

    model = _model(kind, "eager")
    patch = int(model.config.vision_config.patch_size)
    sizes = [(3 * patch, 5 * patch), (6 * patch, 2 * patch)]  # (height, width): two shapes, two grids
    generator = torch.Generator().manual_seed(9)
    paths = []
    for i, (h, w) in enumerate(sizes):
        pixels = torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy()
        paths.append(tmp_path / f"image{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    images = [Image.open(p).convert("RGB") for p in paths]
    processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=(2 * patch) ** 2, max_pixels=(8 * patch) ** 2
    )
    pixels = processor(images=images, return_tensors="pt")
    grids = pixels["image_grid_thw"]
    assert grids.shape == (2, 3) and not torch.equal(grids[0], grids[1])
    ids = [BOS, 17, 33, VSTART, IMAGE, VEND, 40, 41, VSTART, IMAGE, VEND, *range(60, 72)]
    inputs = {**pixels, **expand_vision_placeholders(ids, grids, None, model.config)}
    assert int((inputs["input_ids"] == IMAGE).sum()) == int(grids.prod(-1).sum()) // 4

    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "model", local_files_only=True, attn_implementation="eager"
    ).eval()
    loaded.generation_config.eos_token_id = None
    assert type(loaded) is type(model)
    (length,) = real_length(inputs)
    recorder = PlanRecorder()
    with recorder.recording(), Compressor.from_name("snapkv", compression_ratio=0.5, window_size=4)(loaded) as session:
        out = generate(loaded, inputs, max_new_tokens=4)
    assert session.report.n_keep == (int(length * 0.5),)
    assert [layer.keys.shape[-2] for layer in cache_of(out).layers] == [int(length * 0.5) + 3] * 2
    plans = recorder.per_layer(cache_of(out))
    seq = out.sequences[:, :-1]
    mask = torch.ones_like(seq)
    visibility = {layer: compressed_visibility(p, mask, length, [1] * 3, False) for layer, p in plans.items()}
    extra: dict[str, Any] = reference_inputs(inputs, seq.shape[1])
    reference = masked_logits(loaded, seq, mask, visibility, extra_inputs=extra, explicit_positions=False)
    assert (torch.stack(out.logits) - decode_step_logits(reference, length, 4)).abs().max().item() < 1e-4
    assert media(inputs).keys() == {"pixel_values", "image_grid_thw"}
