"""The Qwen2.5-VL adapter: ``Qwen2_5_VLForConditionalGeneration``.

The Qwen-VL logic lives in :mod:`kvpress_mm.adapters.qwen_vl_base` (modality map from
``mm_token_type_ids``, M-RoPE checks) and :mod:`kvpress_mm.adapters.qwen_vl_prompts`
(placeholder runs, :func:`expand_vision_placeholders`). Videos
may bring ``second_per_grid_ts`` (absolute time in the temporal M-RoPE row); the model uses
it, the checks here do not need it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from kvpress_mm.adapters.qwen_vl_base import QwenVLAdapter
from kvpress_mm.adapters.qwen_vl_prompts import expand_vision_placeholders
from kvpress_mm.hookspecs import hookimpl

__all__ = ["Qwen25VLAdapter", "expand_vision_placeholders"]


class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): images and videos, multimodal RoPE."""

    family = "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the Qwen2.5-VL adapter."""
    register(Qwen25VLAdapter())
