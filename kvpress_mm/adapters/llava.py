"""The LLaVA-1.5 adapter: ``LlavaForConditionalGeneration``."""

from __future__ import annotations

from typing import Any, ClassVar

from kvpress_mm.adapters.vlm import VisionLanguageAdapter
from kvpress_mm.hookspecs import hookimpl


class LlavaAdapter(VisionLanguageAdapter):
    """LLaVA-1.5 (LlavaForConditionalGeneration): image placeholders are ``config.image_token_id``."""

    family = "LLaVA-1.5 (LlavaForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)
    video_inputs: ClassVar[tuple[str, ...]] = ()


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the LLaVA-1.5 adapter."""
    register(LlavaAdapter())
