"""The LLaVA-NeXT adapter: ``LlavaNextForConditionalGeneration``."""

from __future__ import annotations

from typing import Any, ClassVar

from kvpress_mm.adapters.vlm import VisionLanguageAdapter
from kvpress_mm.hookspecs import hookimpl


class LlavaNextAdapter(VisionLanguageAdapter):
    """LLaVA-NeXT (LlavaNextForConditionalGeneration): image placeholders are ``config.image_token_id``."""

    family = "LLaVA-NeXT (LlavaNextForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaNextForConditionalGeneration",)
    video_inputs: ClassVar[tuple[str, ...]] = ()


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the LLaVA-NeXT adapter."""
    register(LlavaNextAdapter())
