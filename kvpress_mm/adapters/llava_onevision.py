"""The LLaVA-OneVision adapter: ``LlavaOnevisionForConditionalGeneration``.

Image placeholders are ``config.image_token_id``, video placeholders ``config.video_token_id``
(input ``pixel_values_videos``); there are no delimiter tokens. Images are packed like
LLaVA-NeXT ("anyres", see :mod:`kvpress_mm.adapters.llava_next`) with OneVision's
``anyres_max_N`` downsampling, except in a multi-image row (``batch_num_images[row] > 1``),
where each image is its base tile plus one newline. A video of ``F`` frames takes
``F * ceil(s / 2)**2 + 1`` placeholders (pooled frame tokens and one newline), ``s`` the
tile's patches per side.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kvpress_mm.adapters.llava import feature_select_strategy
from kvpress_mm.adapters.llava_next import (
    LlavaNextAdapter,
    anyres_image_token_count,
    anyres_num_tiles,
    image_sizes_list,
)
from kvpress_mm.adapters.placeholders import check_media_placeholders
from kvpress_mm.errors import InvalidInputError
from kvpress_mm.hookspecs import hookimpl


def max_num_patches(vision_aspect_ratio: str) -> int | None:
    """``N`` of ``"anyres_max_N"`` (``None`` for any other aspect-ratio mode)."""
    match = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio)
    return int(match.group(1)) if match else None


def video_token_count(model: nn.Module, frames: int) -> int:
    """Placeholders of one video of ``frames`` frames: pooled frame tokens plus one newline."""
    config: Any = model.config
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    return frames * math.ceil(side / 2) ** 2 + 1


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): image and video placeholders.

    Image checks are LLaVA-NeXT's (with ``batch_num_images`` and ``anyres_max_N``); videos
    (``pixel_values_videos`` ``[n_videos, frames, 3, H, W]``) need exactly their placeholders.
    """

    family = "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaOnevisionForConditionalGeneration",)
    video_inputs: ClassVar[tuple[str, ...]] = ("pixel_values_videos",)

    def _tiled(self, inputs: Mapping[str, Any], n_images: int) -> list[bool]:
        batch_num_images = inputs.get("batch_num_images")
        if batch_num_images is None:
            return [True] * n_images  # the model treats every image as a single-image prompt
        if isinstance(batch_num_images, torch.Tensor):
            batch_num_images = batch_num_images.tolist()
        counts = [int(n) for n in batch_num_images]
        if sum(counts) != n_images:
            raise InvalidInputError(
                f"batch_num_images {counts} describes {sum(counts)} images but image_sizes has {n_images}"
            )
        return [n == 1 for n in counts for _ in range(n)]

    def image_token_counts(self, model: nn.Module, inputs: Mapping[str, Any]) -> list[int] | None:
        """Placeholders of each image: anyres in single-image rows, base tile + newline otherwise."""
        sizes = image_sizes_list(inputs["image_sizes"])
        strategy = feature_select_strategy(model, inputs)
        config: Any = model.config
        aspect = inputs.get("vision_aspect_ratio") or getattr(config, "vision_aspect_ratio", "anyres_max_9")
        limit = max_num_patches(str(aspect))
        counts = [
            anyres_image_token_count(model, size, strategy, tiled=tiled, max_num_patches=limit)
            for size, tiled in zip(sizes, self._tiled(inputs, len(sizes)))
        ]
        return None if any(c is None for c in counts) else [int(c) for c in counts if c is not None]

    def image_tiles(self, model: nn.Module, inputs: Mapping[str, Any]) -> list[int]:
        """Tiles the model reads for each image (1 in multi-image rows)."""
        sizes = image_sizes_list(inputs["image_sizes"])
        return [
            anyres_num_tiles(model, size) if tiled else 1 for size, tiled in zip(sizes, self._tiled(inputs, len(sizes)))
        ]

    def check_images(self, model: nn.Module, inputs: Mapping[str, Any], orphans: bool) -> None:
        """Images as LLaVA-NeXT; videos: ``video_token_count(frames)`` placeholders per video."""
        super().check_images(model, inputs, orphans)
        input_ids = inputs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor):
            return
        config: Any = model.config

        def from_pixels(videos: torch.Tensor) -> tuple[list[int], str] | None:
            if videos.dim() != 5:
                raise InvalidInputError(
                    f"pixel_values_videos must be [n_videos, frames, 3, H, W], got shape {tuple(videos.shape)}"
                )
            n_videos, frames = int(videos.shape[0]), int(videos.shape[1])
            per_video = video_token_count(model, frames)
            source = f"pixel_values_videos holds {n_videos} video(s) of {frames} frames, {per_video} tokens each"
            return [per_video] * n_videos, source

        check_media_placeholders(
            input_ids,
            int(config.video_token_id),
            inputs,
            what="video",
            key="video",
            pixels_name="pixel_values_videos",
            from_pixels=from_pixels,
            orphans=orphans,
        )


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the LLaVA-OneVision adapter."""
    register(LlavaOnevisionAdapter())
