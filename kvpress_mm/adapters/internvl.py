"""The InternVL adapter: ``InternVLForConditionalGeneration``."""

from __future__ import annotations

from typing import Any, ClassVar

from kvpress_mm.adapters.vlm import VisionLanguageAdapter
from kvpress_mm.hookspecs import hookimpl


class InternVLAdapter(VisionLanguageAdapter):
    """InternVL (InternVLForConditionalGeneration): image placeholders are ``config.image_token_id``."""

    family = "InternVL (InternVLForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("InternVLForConditionalGeneration",)
    video_inputs: ClassVar[tuple[str, ...]] = ()


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the InternVL adapter."""
    register(InternVLAdapter())
