"""The Qwen2-VL adapter: ``Qwen2VLForConditionalGeneration``."""

from __future__ import annotations

from typing import Any, ClassVar

from kvpress_mm.adapters.vlm import VisionLanguageAdapter
from kvpress_mm.hookspecs import hookimpl


class Qwen2VLAdapter(VisionLanguageAdapter):
    """Qwen2-VL (Qwen2VLForConditionalGeneration): image placeholders are ``config.image_token_id``."""

    family = "Qwen2-VL (Qwen2VLForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2VLForConditionalGeneration",)
    video_inputs: ClassVar[tuple[str, ...]] = ("pixel_values_videos",)


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the Qwen2-VL adapter."""
    register(Qwen2VLAdapter())
