"""The Qwen2.5-VL adapter: ``Qwen2_5_VLForConditionalGeneration``."""

from __future__ import annotations

from typing import Any, ClassVar

from kvpress_mm.adapters.vlm import VisionLanguageAdapter
from kvpress_mm.hookspecs import hookimpl


class Qwen25VLAdapter(VisionLanguageAdapter):
    """Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): image placeholders are ``config.image_token_id``."""

    family = "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)
    video_inputs: ClassVar[tuple[str, ...]] = ("pixel_values_videos",)


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the Qwen2.5-VL adapter."""
    register(Qwen25VLAdapter())
