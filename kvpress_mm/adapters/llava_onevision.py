"""The LLaVA-OneVision adapter: ``LlavaOnevisionForConditionalGeneration``."""

from __future__ import annotations

from typing import Any, ClassVar

from kvpress_mm.adapters.vlm import VisionLanguageAdapter
from kvpress_mm.hookspecs import hookimpl


class LlavaOnevisionAdapter(VisionLanguageAdapter):
    """LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): image placeholders are ``config.image_token_id``."""

    family = "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaOnevisionForConditionalGeneration",)
    video_inputs: ClassVar[tuple[str, ...]] = ("pixel_values_videos",)


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the LLaVA-OneVision adapter."""
    register(LlavaOnevisionAdapter())
