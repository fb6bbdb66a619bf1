"""The Qwen2-VL adapter: ``Qwen2VLForConditionalGeneration``.

The Qwen-VL logic lives in :mod:`kvpress_mm.adapters.qwen_vl_base` (modality map from
``mm_token_type_ids``, M-RoPE checks) and :mod:`kvpress_mm.adapters.qwen_vl_prompts`
(placeholder runs, :func:`expand_vision_placeholders`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from kvpress_mm.adapters.qwen_vl_base import QwenVLAdapter
from kvpress_mm.adapters.qwen_vl_prompts import expand_vision_placeholders
from kvpress_mm.hookspecs import hookimpl

__all__ = ["Qwen2VLAdapter", "expand_vision_placeholders"]


class Qwen2VLAdapter(QwenVLAdapter):
    """Qwen2-VL (Qwen2VLForConditionalGeneration): images and videos, multimodal RoPE."""

    family = "Qwen2-VL (Qwen2VLForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2VLForConditionalGeneration",)


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the Qwen2-VL adapter."""
    register(Qwen2VLAdapter())
