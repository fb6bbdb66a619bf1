"""The LLaVA-1.5 adapter: ``LlavaForConditionalGeneration``.

Image placeholders are ``config.image_token_id`` (``image_token_index``); LLaVA has no vision
delimiter tokens. Each image in ``pixel_values`` ``[n_images, 3, H, W]`` takes one placeholder
per vision-tower output token: ``(H / patch) * (W / patch)`` patches, plus the CLS token of a
CLIP tower, minus the first token when ``vision_feature_select_strategy == "default"``
(576 for the real LLaVA-1.5 checkpoints at 336 px).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kvpress_mm.adapters.vlm import CountCheckedAdapter
from kvpress_mm.hookspecs import hookimpl

#: Vision towers whose token count per image is known: model_type -> leading CLS tokens.
VISION_TOWER_CLS_TOKENS: dict[str, int] = {"clip_vision_model": 1, "siglip_vision_model": 0}


def feature_select_strategy(model: nn.Module, inputs: Mapping[str, Any]) -> str:
    """The call's ``vision_feature_select_strategy``, else the config's."""
    strategy = inputs.get("vision_feature_select_strategy")
    if strategy is None:
        config: Any = model.config
        strategy = getattr(config, "vision_feature_select_strategy", "default")
    return str(strategy)


def tokens_per_tile(model: nn.Module, height: int, width: int, strategy: str) -> int | None:
    """Vision-tower tokens the projector emits for one ``height x width`` tile.

    ``None`` when the vision tower is not one whose layout is known (see
    :data:`VISION_TOWER_CLS_TOKENS`); the model then checks the count itself.
    """
    config: Any = model.config
    vision = config.vision_config
    cls_tokens = VISION_TOWER_CLS_TOKENS.get(str(getattr(vision, "model_type", "")))
    if cls_tokens is None:
        return None
    patch = int(vision.patch_size)
    count = (height // patch) * (width // patch) + cls_tokens
    return count - 1 if strategy == "default" else count


class LlavaAdapter(CountCheckedAdapter):
    """LLaVA-1.5 (LlavaForConditionalGeneration): image placeholders are ``config.image_token_id``.

    Inputs are checked before the prefill: images need placeholder tokens, exactly
    ``tokens_per_image`` per image (each row a whole number of images), and placeholders need
    images. The counts come from the image features ``generate`` computes before the prefill
    (``mm_encoder_outputs``), or from ``pixel_values`` in a plain forward.
    """

    family = "LLaVA-1.5 (LlavaForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)
    video_inputs: ClassVar[tuple[str, ...]] = ()

    def check_images(self, model: nn.Module, inputs: Mapping[str, Any], orphans: bool) -> None:
        """The call's image placeholders against its images (features or pixels)."""

        def from_pixels(pixel_values: torch.Tensor) -> tuple[list[int], str] | None:
            if inputs.get("image_sizes") is not None or pixel_values.dim() != 4:
                return None  # a variable-size tower (Pixtral-style): the model checks the count itself
            height, width = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
            per_image = tokens_per_tile(model, height, width, feature_select_strategy(model, inputs))
            if per_image is None:
                return None
            n_images = int(pixel_values.shape[0])
            return [per_image] * n_images, f"pixel_values holds {n_images} image(s) of {per_image} tokens each"

        self.check_image_placeholders(model, inputs, from_pixels, orphans=orphans)


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the LLaVA-1.5 adapter."""
    register(LlavaAdapter())
