"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL models and their inputs (no hub, no processor).

Models come from the configs of TRANSFORMERS-NOTES section 1.1: text decoders of 2 layers, 4
query heads, 2 KV heads (head_dim 16), vocabulary 256, ``mrope_section`` [2, 3, 3];
``generation_config.eos_token_id = None`` so random weights never stop generation early.

Prompts are built by hand here, with placeholder runs whose lengths the MODEL reports (its own
``get_image_features`` / ``get_video_features``), so the tests never share the adapter's
arithmetic (``expand_vision_placeholders`` is tested against these prompts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tests.helpers.tiny_models import BOS, PAD, TEXT_CONFIG, instantiate

# special ids at the top of the text decoder's vocabulary (tiny_models.VOCAB, 256)
IMAGE, VIDEO, VSTART, VEND = 250, 251, 252, 253
TEXT_IDS = (3, 240)  # random text tokens are drawn from [3, 240): never a special id

KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
CLASS_NAMES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}

# A layout is a list of: int n (n random text tokens), ("image", (h, w)) or ("video", (t, h, w)),
# grids in patches before the 2x2 merge. Images of different sizes: different grids.
LAYOUTS: dict[str, list[Any]] = {
    "one-image": [6, ("image", (4, 6)), 8],
    "three-images": [3, ("image", (4, 6)), 2, ("image", (2, 4)), 3, ("image", (6, 6)), 5],
    "no-image": [24],
    "video": [5, ("video", (2, 4, 4)), 7],
}


def _text_config(kind: str) -> dict[str, Any]:
    text: dict[str, Any] = dict(
        TEXT_CONFIG,
        # head_dim 16: sum(mrope_section) must be head_dim / 2
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    if kind == "qwen3_vl":
        text["head_dim"] = 16
        text["rope_parameters"]["mrope_interleaved"] = True
    return text


def config(kind: str) -> Any:
    """The tiny config of ``kind`` (one of :data:`KINDS`)."""
    import transformers as tf

    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if kind == "qwen2_vl":
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return tf.Qwen2VLConfig(text_config=_text_config(kind), vision_config=vision, **ids)
    if kind == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        return tf.Qwen2_5_VLConfig(text_config=_text_config(kind), vision_config=vision, **ids)
    if kind == "qwen3_vl":
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        )
        return tf.Qwen3VLConfig(text_config=_text_config(kind), vision_config=vision, **ids)
    raise ValueError(f"unknown kind {kind!r}")


def build(kind: str, attn_implementation: str = "sdpa", *, seed: int = 0, sharpen: bool = True) -> nn.Module:
    """A tiny random float32 model of ``kind`` in eval mode."""
    import transformers as tf

    return instantiate(getattr(tf, CLASS_NAMES[kind]), config(kind), attn_implementation, seed=seed, sharpen=sharpen)


def _pixels(model: nn.Module, patches: int, generator: torch.Generator) -> torch.Tensor:
    vision = model.config.vision_config
    return torch.randn(patches, 3 * vision.temporal_patch_size * vision.patch_size**2, generator=generator)


@torch.no_grad()
def _feature_counts(model: nn.Module, what: str, pixels: torch.Tensor, grid: torch.Tensor) -> list[int]:
    """Features per image / video, as the model's vision tower produces them."""
    inner = model.model
    if what == "image":
        out = inner.get_image_features(pixel_values=pixels, image_grid_thw=grid, return_dict=True)
    else:
        out = inner.get_video_features(pixel_values_videos=pixels, video_grid_thw=grid, return_dict=True)
    return [int(chunk.shape[0]) for chunk in out.pooler_output]


def prompt(model: nn.Module, layout: Sequence[Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt ``[1, L]`` (BOS first) with its pixels, grids and ``mm_token_type_ids``."""
    generator = torch.Generator().manual_seed(1000 + seed)
    media: dict[str, list[tuple[int, ...]]] = {"image": [], "video": []}
    for item in layout:
        if not isinstance(item, int):
            media[item[0]].append(tuple(item[1]) if item[0] == "video" else (1, *item[1]))
    inputs: dict[str, torch.Tensor] = {}
    counts: dict[str, list[int]] = {}
    for what, pixels_name, grid_name in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if media[what]:
            grid = torch.tensor(media[what], dtype=torch.long)
            pixels = _pixels(model, int(grid.prod(-1).sum()), generator)
            inputs[pixels_name], inputs[grid_name] = pixels, grid
            counts[what] = _feature_counts(model, what, pixels, grid)
    per_frame = model.config.model_type == "qwen3_vl"
    ids = [BOS]
    taken = {"image": 0, "video": 0}
    for item in layout:
        if isinstance(item, int):
            ids += torch.randint(*TEXT_IDS, (item,), generator=generator).tolist()
            continue
        what = item[0]
        n = counts[what][taken[what]]
        taken[what] += 1
        token = IMAGE if what == "image" else VIDEO
        if what == "video" and per_frame:
            # Qwen3VLProcessor: each frame in its own <vision_start> ... <vision_end> (timestamps omitted)
            frames = item[1][0]
            ids += [VSTART] + [VSTART, *[token] * (n // frames), VEND] * frames + [VEND]
        else:
            ids += [VSTART, *[token] * n, VEND]
    input_ids = torch.tensor([ids])
    types = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "mm_token_type_ids": types, **inputs}


MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def batch(prompts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Left-pad single prompts into one batch; pixels and grids concatenated in row order."""
    width = max(p["input_ids"].shape[1] for p in prompts)
    out: dict[str, torch.Tensor] = {}
    for name, fill in (("input_ids", PAD), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        out[name] = torch.full((len(prompts), width), fill, dtype=torch.long)
        for row, p in enumerate(prompts):
            out[name][row, width - p[name].shape[1] :] = p[name][0]
    for key in MEDIA_KEYS:
        parts = [p[key] for p in prompts if key in p]
        if parts:
            out[key] = torch.cat(parts)
    return out


def media(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pixel and grid inputs of a prompt."""
    return {k: v for k, v in inputs.items() if k in MEDIA_KEYS}


def reference_inputs(inputs: dict[str, torch.Tensor], total: int) -> dict[str, torch.Tensor]:
    """Extra inputs of a full forward over ``total`` columns: the media, mm_token_type_ids padded with text."""
    types = inputs["mm_token_type_ids"]
    padded = torch.cat([types, types.new_zeros(types.shape[0], total - types.shape[1])], dim=1)
    return {**media(inputs), "mm_token_type_ids": padded}


def generate(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    """Greedy generate returning a dict with raw logits and the cache.

    The vision special ids are never generated (``suppress_tokens``): a generated placeholder
    id is embedded as text while decoding, but a full forward over the sequence would read it
    as a placeholder that needs features. ``logits`` stay the raw, unsuppressed logits.
    """
    options: dict[str, Any] = dict(
        max_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        suppress_tokens=[IMAGE, VIDEO, VSTART, VEND],
    )
    options.update(kwargs)
    return model.generate(**inputs, **options)  # type: ignore[operator]


def real_length(inputs: dict[str, torch.Tensor]) -> list[int]:
    """Real (non-padding) prompt tokens of each row."""
    return [int(n) for n in inputs["attention_mask"].sum(-1).tolist()]
