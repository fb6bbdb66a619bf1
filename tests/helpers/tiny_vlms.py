"""Tiny random LLaVA / LLaVA-NeXT / LLaVA-OneVision / InternVL models and their inputs.

No hub, no processor: models come from configs (TRANSFORMERS-NOTES section 1.1), prompts are
random token ids with placeholder runs whose lengths the MODEL itself reports (its own
``get_image_features`` / ``get_video_features``), so the tests never share the adapters'
arithmetic. Text decoders: 2 layers, 4 query heads, 2 KV heads (head_dim 16), vocabulary 256;
``generation_config.eos_token_id = None`` so random weights never stop generation early.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tests.helpers.tiny_models import BOS, PAD, TEXT_CONFIG, instantiate

# special ids at the top of the text decoder's vocabulary (tiny_models.VOCAB, 256)
IMAGE, VIDEO, IMG_START, IMG_END = 250, 251, 252, 253
TEXT_IDS = (3, 240)  # random text tokens are drawn from [3, 240): never a special id

FAMILIES = ("llava", "llava_next", "llava_onevision", "internvl")
TILE = {"llava": 28, "llava_next": 28, "llava_onevision": 28, "internvl": 56}
GRID_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]
# original (H, W) of the anyres images: different grids and unpadding
ANYRES_SIZES = [(56, 28), (30, 50), (60, 60), (28, 56), (20, 45)]
# tiles per InternVL image
INTERNVL_TILES = [1, 3, 2, 4]

_SMALL_VISION: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def config(family: str, **overrides: Any) -> Any:
    """The tiny config of ``family`` (keyword overrides go to the top-level config)."""
    import transformers as tf

    if family == "llava":
        vision = tf.CLIPVisionConfig(**_SMALL_VISION, image_size=28, patch_size=14, projection_dim=32)
        kwargs = dict(image_token_index=IMAGE, image_seq_length=4, vision_feature_layer=-2)
        kwargs.update({"vision_feature_select_strategy": "default", **overrides})
        return tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**TEXT_CONFIG), **kwargs)
    if family == "llava_next":
        vision = tf.CLIPVisionConfig(**_SMALL_VISION, image_size=28, patch_size=14, projection_dim=32)
        kwargs = dict(image_token_index=IMAGE, image_grid_pinpoints=GRID_PINPOINTS, vision_feature_layer=-2)
        kwargs.update({"vision_feature_select_strategy": "default", **overrides})
        return tf.LlavaNextConfig(vision_config=vision, text_config=tf.LlamaConfig(**TEXT_CONFIG), **kwargs)
    if family == "llava_onevision":
        vision = tf.SiglipVisionConfig(**_SMALL_VISION, image_size=28, patch_size=14, vision_use_head=False)
        kwargs = dict(image_token_index=IMAGE, video_token_index=VIDEO, image_grid_pinpoints=GRID_PINPOINTS)
        kwargs.update(vision_feature_layer=-1, vision_feature_select_strategy="full")
        kwargs.update({"vision_aspect_ratio": "anyres_max_9", **overrides})
        return tf.LlavaOnevisionConfig(vision_config=vision, text_config=tf.Qwen2Config(**TEXT_CONFIG), **kwargs)
    if family == "internvl":
        vision = tf.InternVLVisionConfig(**_SMALL_VISION, image_size=[56, 56], patch_size=[14, 14])
        kwargs = dict(image_token_id=IMAGE, image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1)
        kwargs.update({"vision_feature_select_strategy": "default", **overrides})
        return tf.InternVLConfig(vision_config=vision, text_config=tf.Qwen2Config(**TEXT_CONFIG), **kwargs)
    raise ValueError(f"unknown family {family!r}")


def model_class(family: str) -> type[nn.Module]:
    """The ``*ForConditionalGeneration`` class of ``family``."""
    import transformers as tf

    return {
        "llava": tf.LlavaForConditionalGeneration,
        "llava_next": tf.LlavaNextForConditionalGeneration,
        "llava_onevision": tf.LlavaOnevisionForConditionalGeneration,
        "internvl": tf.InternVLForConditionalGeneration,
    }[family]


def build_vlm(
    family: str, attn_implementation: str = "sdpa", *, seed: int = 0, sharpen: bool = True, **overrides: Any
) -> nn.Module:
    """A tiny random vision-language model of ``family`` (see :data:`FAMILIES`), float32, eval mode."""
    return instantiate(
        model_class(family), config(family, **overrides), attn_implementation, seed=seed, sharpen=sharpen
    )


# -- prompts --------------------------------------------------------------------------------------


@dataclass
class VLMPrompt:
    """One prompt: ``input_ids`` ``[1, L]`` and the pixel inputs its placeholders stand for."""

    input_ids: torch.Tensor
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)
    image_counts: list[int] = field(default_factory=list)  # placeholders of each image, as the model packs it
    video_counts: list[int] = field(default_factory=list)
    tiles: list[int] = field(default_factory=list)  # anyres tiles / InternVL tiles of each image
    # what the builder put at each position: 0 text (delimiters included), 1 image, 2 video
    modality: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Prompt length (all real tokens)."""
        return int(self.input_ids.shape[1])

    def inputs(self) -> dict[str, torch.Tensor]:
        """``input_ids``, an all-ones ``attention_mask`` and the pixel inputs."""
        return {"input_ids": self.input_ids, "attention_mask": torch.ones_like(self.input_ids), **self.pixels}


def _text(n: int, generator: torch.Generator) -> list[int]:
    return torch.randint(*TEXT_IDS, (n,), generator=generator).tolist()


@torch.no_grad()
def image_pixels(
    family: str, model: nn.Module, n_images: int, *, seed: int = 0, multi_image: bool | None = None
) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
    """Random pixel inputs for ``n_images`` images: ``(pixels, tokens per image, tiles per image)``.

    Tokens per image come from the model's own ``get_image_features``. Anyres images take
    :data:`ANYRES_SIZES` in turn (starting at ``seed``), InternVL images :data:`INTERNVL_TILES`.
    """
    if n_images == 0:
        return {}, [], []
    generator = torch.Generator().manual_seed(500 + seed)
    tile = TILE[family]
    inner: Any = model.model  # type: ignore[union-attr]
    if family == "llava":
        pixel_values = torch.randn(n_images, 3, tile, tile, generator=generator)
        features = inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        return {"pixel_values": pixel_values}, [int(f.shape[0]) for f in features], [1] * n_images
    if family == "internvl":
        tiles = [INTERNVL_TILES[(seed + i) % len(INTERNVL_TILES)] for i in range(n_images)]
        pixel_values = torch.randn(sum(tiles), 3, tile, tile, generator=generator)
        per_tile = int(inner.get_image_features(pixel_values=pixel_values[:1], return_dict=True).pooler_output.shape[1])
        return {"pixel_values": pixel_values}, [per_tile * t for t in tiles], tiles
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = [ANYRES_SIZES[(seed + i) % len(ANYRES_SIZES)] for i in range(n_images)]
    tiles = [image_size_to_num_patches(s, GRID_PINPOINTS, tile) for s in sizes]
    pixels: dict[str, torch.Tensor] = {
        "pixel_values": torch.randn(n_images, max(tiles), 3, tile, tile, generator=generator),
        "image_sizes": torch.tensor(sizes),
    }
    extra: dict[str, Any] = {}
    if family == "llava_onevision":
        # the processor's convention: one row holding n images -> batch_num_images [n]
        pixels["batch_num_images"] = torch.tensor([n_images])
        extra["batch_num_images"] = pixels["batch_num_images"]
        if n_images > 1 if multi_image is None else multi_image:
            tiles = [1] * n_images
    features = inner.get_image_features(
        pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"], return_dict=True, **extra
    ).pooler_output
    return pixels, [int(f.shape[0]) for f in features], tiles


@torch.no_grad()
def video_pixels(model: nn.Module, frames: int, *, seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """A random OneVision video ``[1, frames, 3, 28, 28]`` and its token count (from the model)."""
    generator = torch.Generator().manual_seed(700 + seed)
    videos = torch.randn(1, frames, 3, 28, 28, generator=generator)
    inner: Any = model.model  # type: ignore[union-attr]
    features = inner.get_video_features(pixel_values_videos=videos, return_dict=True).pooler_output
    return {"pixel_values_videos": videos}, int(features.shape[1])


def make_prompt(
    family: str,
    model: nn.Module,
    n_images: int,
    *,
    seed: int = 0,
    text_lengths: list[int] | None = None,
    video_frames: int | None = None,
) -> VLMPrompt:
    """``BOS, text, [image, text]*n_images`` (then ``video, text`` if ``video_frames``), random text.

    ``text_lengths`` gives the text run before the first image and after each image / video
    (default 9, 6, 5, 4, ...). InternVL images are wrapped in ``<img>`` ... ``</img>``.
    """
    generator = torch.Generator().manual_seed(1000 + seed)
    pixels, counts, tiles = image_pixels(family, model, n_images, seed=seed)
    runs = n_images + 1 + (1 if video_frames else 0)
    lengths = text_lengths or [9] + [max(2, 6 - i) for i in range(runs - 1)]
    assert len(lengths) == runs, f"need {runs} text lengths"
    ids = [BOS, *_text(lengths[0], generator)]
    modality = [0] * len(ids)
    for i, count in enumerate(counts):
        if family == "internvl":
            ids += [IMG_START, *[IMAGE] * count, IMG_END]
            modality += [0, *[1] * count, 0]
        else:
            ids += [IMAGE] * count
            modality += [1] * count
        ids += _text(lengths[i + 1], generator)
        modality += [0] * lengths[i + 1]
    video_counts: list[int] = []
    if video_frames:
        video, count = video_pixels(model, video_frames, seed=seed)
        pixels.update(video)
        video_counts.append(count)
        ids += [VIDEO] * count + _text(lengths[-1], generator)
        modality += [2] * count + [0] * lengths[-1]
    return VLMPrompt(torch.tensor([ids]), pixels, counts, video_counts, tiles, modality)


def left_pad_batch(family: str, prompts: list[VLMPrompt]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(input_ids, attention_mask, pixels)`` of a left-padded batch of ``prompts``.

    Pixel inputs are concatenated in row order (the model consumes them in that order);
    anyres ``pixel_values`` are zero-padded to the largest tile count, as processors do.
    """
    width = max(p.length for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.length :] = p.input_ids[0]
        mask[b, width - p.length :] = 1
    pixels: dict[str, torch.Tensor] = {}
    names = dict.fromkeys(name for p in prompts for name in p.pixels)
    for name in names:
        parts = [p.pixels[name] for p in prompts if name in p.pixels]
        if name == "pixel_values" and parts[0].dim() == 5:
            most = max(int(t.shape[1]) for t in parts)
            parts = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, most - int(t.shape[1]))) for t in parts]
        if name == "batch_num_images":
            # rows without images hold 0 images
            parts = [p.pixels.get(name, torch.tensor([0])) for p in prompts]
        pixels[name] = torch.cat(parts, dim=0)
    return ids, mask, pixels


def generate_vlm(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    """Greedy generate returning a dict with scores, raw logits and the cache."""
    options: dict[str, Any] = dict(
        max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True
    )
    options.update(kwargs)
    return model.generate(**inputs, **options)  # type: ignore[operator]
