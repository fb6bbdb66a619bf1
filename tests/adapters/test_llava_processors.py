"""Real inputs for LLaVA-1.5 and LLaVA-NeXT: PNG files through the model's own processor, offline.

The tokenizer is built from scratch (a WordLevel vocabulary with ``<image>`` at the model's
image token id), the image processors are the PIL ones (torchvision is unusable here), the
processor and the tiny model go through ``save_pretrained`` / ``from_pretrained(local dir)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kvpress_mm import Compressor, Modality
from kvpress_mm.registry import find_adapter
from tests.helpers.masked_reference import PlanRecorder, cache_of
from tests.helpers.tiny_vlms import GRID_PINPOINTS, IMAGE, PAD, build_vlm, generate_vlm, model_class
from tests.helpers.tokenizers import word_level_tokenizer

ATOL = 1e-4
NEW_TOKENS = 3
WORDS = ["<pad>", "<s>", "</s>", "USER:", "ASSISTANT:"] + [f"w{i}" for i in range(40)]
# (width, height) of the PNG files: different sizes, so LLaVA-NeXT picks different tile grids
PNG_SIZES = [(40, 30), (64, 64), (20, 50)]
PROMPTS = [
    "USER: <image> w1 w2 w3 w4 w5 w6 w7 w8 ASSISTANT:",
    "USER: w3 <image> w4 w5 <image> w6 w7 ASSISTANT:",
]


def tokenizer() -> Any:
    """A WordLevel tokenizer built in memory: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<image>`` 250."""
    return word_level_tokenizer(WORDS, {"<image>": IMAGE}, {"image_token": "<image>"})


def processor(family: str) -> Any:
    """``LlavaProcessor`` / ``LlavaNextProcessor`` around the PIL image processor, 28 px tiles."""
    import transformers as tf

    common = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    options = dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family == "llava":
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        return tf.LlavaProcessor(
            image_processor=LlavaImageProcessorPil(**common), tokenizer=tokenizer(), image_token="<image>", **options
        )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(**common, image_grid_pinpoints=GRID_PINPOINTS)
    return tf.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer(), image_token="<image>", **options
    )


def write_pngs(directory: Path) -> list[Path]:
    """Random-colour PNG files of :data:`PNG_SIZES`."""
    paths = []
    for i, (width, height) in enumerate(PNG_SIZES):
        pixels = (np.random.RandomState(i).rand(height, width, 3) * 255).astype("uint8")
        path = directory / f"image{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _local_model_and_processor(family: str, impl: str, tmp_path: Path) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = build_vlm(family, impl, seed=4)
    model.save_pretrained(tmp_path / "model")  # type: ignore[operator]
    processor(family).save_pretrained(tmp_path / "model")
    loaded = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "model", local_files_only=True, attn_implementation=impl
    ).eval()
    assert type(loaded) is model_class(family)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    loaded.generation_config.eos_token_id = None  # random weights: never stop early
    loaded.generation_config.pad_token_id = PAD
    return loaded, AutoProcessor.from_pretrained(tmp_path / "model", local_files_only=True)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["snapkv", "lookm-pivotal"])
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_png_files_through_the_processor_and_a_local_checkpoint(
    family: str, name: str, impl: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, proc = _local_model_and_processor(family, impl, tmp_path)
    images = [Image.open(path).convert("RGB") for path in write_pngs(tmp_path)]
    per_row = [[images[0]], images[1:]]
    batch = proc(images=per_row, text=PROMPTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert bool((mask[0] == 0).any()), "the rows differ in length: the first is left-padded"

    # the processor expanded each <image> into exactly as many placeholders as the model has features
    features_inputs = {k: batch[k] for k in ("pixel_values", "image_sizes") if k in batch}
    inner: Any = model.model  # type: ignore[union-attr]
    with torch.no_grad():
        features = inner.get_image_features(**features_inputs, return_dict=True).pooler_output
    counts = [int(f.shape[0]) for f in features]
    assert (ids == IMAGE).sum(-1).tolist() == [counts[0], counts[1] + counts[2]]
    if family == "llava_next":
        assert len(set(counts)) > 1, "different image sizes give different placeholder counts"

    # the adapter's modality map: image positions are exactly the processor's placeholders
    width = ids.shape[1]
    modality = find_adapter(model).modality_map(model, dict(batch), width)
    assert torch.equal(modality == Modality.IMAGE, ids == IMAGE)
    assert torch.equal(modality == Modality.PADDING, mask == 0)
    assert (modality == Modality.TEXT).sum(-1).tolist() == (mask.sum(-1) - (ids == IMAGE).sum(-1)).tolist()

    ratio = 0.6
    compressor = Compressor.from_name(name, compression_ratio=ratio, **({"window_size": 4} if name == "snapkv" else {}))
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model) as session:
        out = generate_vlm(model, dict(batch), max_new_tokens=NEW_TOKENS)
        report = session.report
        singles = []
        for text, row_images in zip(PROMPTS, per_row, strict=True):
            single = proc(images=[row_images], text=[text], return_tensors="pt")
            singles.append(generate_vlm(model, dict(single), max_new_tokens=NEW_TOKENS))
    lengths = mask.sum(-1).tolist()
    budgets = [int(n * (1 - ratio)) for n in lengths]
    assert report.prompt_lengths == tuple(lengths)
    assert report.n_keep == tuple(budgets)
    cache = cache_of(out)
    for layer_plans in recorder.per_layer(cache).values():
        assert layer_plans[0].slot_valid.sum(-1).tolist() == budgets
    assert all(layer.keys.shape[-2] == max(budgets) + NEW_TOKENS - 1 for layer in cache.layers)
    # each row generates what its prompt generates alone
    logits = torch.stack(out.logits)
    for row, single in enumerate(singles):
        assert (logits[:, row] - torch.stack(single.logits)[:, 0]).abs().max().item() < ATOL
