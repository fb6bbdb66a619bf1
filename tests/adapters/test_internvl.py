"""InternVL specifics: the placeholder expansion helper, and real inputs through the PIL image processor.

``InternVLProcessor`` needs a video processor (torchvision), so prompts are expanded with
:func:`kvpress_mm.adapters.internvl.expand_image_placeholders` and tiled with
``GotOcr2ImageProcessorPil``, InternVL's image processor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kvpress_mm import Compressor, Modality
from kvpress_mm.adapters.internvl import expand_image_placeholders
from kvpress_mm.registry import find_adapter
from tests.helpers.masked_reference import (
    PlanRecorder,
    cache_of,
    compressed_visibility,
    decode_step_logits,
    masked_logits,
    plain_visibility,
)
from tests.helpers.tiny_vlms import IMAGE, IMG_END, IMG_START, PAD, build_vlm, generate_vlm
from tests.helpers.tokenizers import word_level_tokenizer

ATOL = 1e-4
NEW_TOKENS = 3

# -- expand_image_placeholders --------------------------------------------------------------------


def test_expand_text_prompt_like_the_processor() -> None:
    text = "USER: <IMG_CONTEXT> what and <IMG_CONTEXT> ?"
    out = expand_image_placeholders(text, [2, 1], 3)
    assert out == ("USER: <img>" + "<IMG_CONTEXT>" * 6 + "</img> what and <img>" + "<IMG_CONTEXT>" * 3 + "</img> ?")
    # a custom placeholder (e.g. "<image>" in a chat template) and custom tokens
    out = expand_image_placeholders("a <image> b", [1], 2, placeholder="<image>", image_token="<c>")
    assert out == "a <img><c><c></img> b"
    # a prompt without images is returned as is
    assert expand_image_placeholders("no images", [], 256) == "no images"


def test_expand_token_ids() -> None:
    ids = [1, 5, IMAGE, 6, IMAGE, 7]
    out = expand_image_placeholders(ids, [1, 2], 2, image_token=IMAGE, start_token=IMG_START, end_token=IMG_END)
    assert out == [1, 5, IMG_START, IMAGE, IMAGE, IMG_END, 6, IMG_START, *[IMAGE] * 4, IMG_END, 7]
    # a tuple (or a tensor's tolist()) works alike
    tokens = {"image_token": IMAGE, "start_token": IMG_START, "end_token": IMG_END}
    assert expand_image_placeholders(tuple(ids), [1, 2], 2, **tokens) == out
    assert expand_image_placeholders(torch.tensor(ids).tolist(), [1, 2], 2, **tokens) == out
    # a distinct placeholder id
    assert expand_image_placeholders([9, 4], [1], 1, placeholder=9, **tokens) == [IMG_START, IMAGE, IMG_END, 4]


@pytest.mark.parametrize(
    ("prompt", "tiles", "length", "options", "match"),
    [
        ("a <IMG_CONTEXT> b", [1, 2], 4, {}, r"1 image placeholder\(s\) .* describes 2 image"),
        ("a b", [1], 4, {}, r"0 image placeholder\(s\)"),
        ("a <IMG_CONTEXT>", [0], 4, {}, "must be positive"),
        ("a <IMG_CONTEXT>", [1], 0, {}, "must be positive"),
        ("a <IMG_CONTEXT>", [1], 4, {"image_token": 250}, "a text prompt needs text tokens"),
        ([1, 250], [1], 4, {}, "a prompt of token ids needs token ids"),
        ([1, 250, 250], [1], 4, {"image_token": 250, "start_token": 252, "end_token": 253}, r"2 image placeholder"),
    ],
)
def test_expand_refuses_mismatches(
    prompt: Any, tiles: list[int], length: int, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        expand_image_placeholders(prompt, tiles, length, **options)


# -- real inputs: PNG files, GotOcr2ImageProcessorPil, a local checkpoint ---------------------------

WORDS = ["<pad>", "<s>", "</s>", "USER:", "ASSISTANT:"] + [f"w{i}" for i in range(40)]
PNG_SIZES = [(40, 30), (120, 60), (50, 100)]  # (width, height): 1+, 2+ and 2+ tiles (thumbnail included)


def tokenizer() -> Any:
    """A WordLevel tokenizer built in memory with InternVL's image tokens at the tiny model's ids."""
    # the special tokens split "<img><IMG_CONTEXT>...</img>" (no spaces) into its tokens
    special = {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>", "end_image_token": "</img>"}
    return word_level_tokenizer(WORDS, {"<IMG_CONTEXT>": IMAGE, "<img>": IMG_START, "</img>": IMG_END}, special)


def image_processor() -> Any:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True, max_patches=4)


def write_pngs(directory: Path) -> list[Path]:
    paths = []
    for i, (width, height) in enumerate(PNG_SIZES):
        pixels = (np.random.RandomState(10 + i).rand(height, width, 3) * 255).astype("uint8")
        path = directory / f"image{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


PROMPTS = [
    "USER: <IMG_CONTEXT> w1 w2 w3 w4 w5 w6 w7 ASSISTANT:",
    "USER: w3 <IMG_CONTEXT> w4 <IMG_CONTEXT> w5 ASSISTANT:",
]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["snapkv", "lookm-pivotal"])
def test_png_files_expanded_with_the_helper_and_a_local_checkpoint(
    name: str, impl: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForImageTextToText

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = build_vlm("internvl", impl, seed=6)
    original.save_pretrained(tmp_path / "model")  # type: ignore[operator]
    model = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "model", local_files_only=True, attn_implementation=impl
    ).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    config: Any = model.config

    images = [Image.open(path).convert("RGB") for path in write_pngs(tmp_path)]
    pixels = image_processor()(images=images, return_tensors="pt")
    tiles = pixels["num_patches"].tolist()
    assert len(set(tiles)) > 1, "the images are cut into different numbers of tiles"
    assert int(pixels["pixel_values"].shape[0]) == sum(tiles)
    texts = [
        expand_image_placeholders(PROMPTS[0], tiles[:1], config.image_seq_length),
        expand_image_placeholders(PROMPTS[1], tiles[1:], config.image_seq_length),
    ]
    tok = tokenizer()
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    batch["pixel_values"] = pixels["pixel_values"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert bool((mask == 0).any()), "a left-padded batch"

    # placeholders: image_seq_length per tile, and exactly the model's feature count
    inner: Any = model.model
    with torch.no_grad():
        features = inner.get_image_features(pixel_values=pixels["pixel_values"], return_dict=True).pooler_output
    per_tile = int(features.shape[1])
    assert per_tile == config.image_seq_length
    assert (ids == IMAGE).sum(-1).tolist() == [per_tile * tiles[0], per_tile * (tiles[1] + tiles[2])]
    assert (ids == IMG_START).sum(-1).tolist() == [1, 2]
    assert (ids == IMG_END).sum(-1).tolist() == [1, 2]

    modality = find_adapter(model).modality_map(model, batch, ids.shape[1])
    assert torch.equal(modality == Modality.IMAGE, ids == IMAGE)
    delimiters = (ids == IMG_START) | (ids == IMG_END)
    assert bool((modality[delimiters] == Modality.TEXT).all()), "<img> and </img> are text"
    assert torch.equal(modality == Modality.PADDING, mask == 0)

    ratio = 0.6
    compressor = Compressor.from_name(name, compression_ratio=ratio, **({"window_size": 4} if name == "snapkv" else {}))
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model) as session:
        out = generate_vlm(model, batch, max_new_tokens=NEW_TOKENS)
        report = session.report
        first_alone = {
            "input_ids": ids[:1, mask[0].bool()],
            "attention_mask": torch.ones(1, int(mask[0].sum()), dtype=torch.long),
            "pixel_values": pixels["pixel_values"][: tiles[0]],
        }
        single = generate_vlm(model, first_alone, max_new_tokens=NEW_TOKENS)
    lengths = mask.sum(-1).tolist()
    budgets = [int(n * (1 - ratio)) for n in lengths]
    assert report.n_keep == tuple(budgets)
    cache = cache_of(out)
    plans = recorder.per_layer(cache)
    for layer_plans in plans.values():
        assert layer_plans[0].slot_valid.sum(-1).tolist() == budgets
    assert all(layer.keys.shape[-2] == max(budgets) + NEW_TOKENS - 1 for layer in cache.layers)
    got = torch.stack(out.logits)
    assert (got[:, 0] - torch.stack(single.logits)[:, 0]).abs().max().item() < ATOL
    if name == "snapkv":
        # eviction only: the batch's decode logits equal the per-head masked reference
        width = ids.shape[1]
        full_mask = torch.cat([mask, torch.ones(2, NEW_TOKENS - 1, dtype=mask.dtype)], dim=1)
        seq = out.sequences[:, :-1]
        calls = [1] * (NEW_TOKENS - 1)
        visibility = {layer: compressed_visibility(p, full_mask, width, calls, False) for layer, p in plans.items()}
        extra = {"pixel_values": pixels["pixel_values"]}
        reference = decode_step_logits(masked_logits(model, seq, full_mask, visibility, extra_inputs=extra), width, 3)
        assert (got - reference).abs().max().item() < ATOL
        plain = {layer: plain_visibility(full_mask) for layer in plans}
        unmasked = decode_step_logits(masked_logits(model, seq, full_mask, plain, extra_inputs=extra), width, 3)
        assert (got[1:] - unmasked[1:]).abs().max().item() > 1e-3
