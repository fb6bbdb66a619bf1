"""The Qwen3-VL adapter: ``Qwen3VLForConditionalGeneration``."""

from __future__ import annotations

from typing import Any, ClassVar

from kvpress_mm.adapters.vlm import VisionLanguageAdapter
from kvpress_mm.hookspecs import hookimpl


class Qwen3VLAdapter(VisionLanguageAdapter):
    """Qwen3-VL (Qwen3VLForConditionalGeneration): image placeholders are ``config.image_token_id``."""

    family = "Qwen3-VL (Qwen3VLForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration",)
    video_inputs: ClassVar[tuple[str, ...]] = ("pixel_values_videos",)


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the Qwen3-VL adapter."""
    register(Qwen3VLAdapter())
