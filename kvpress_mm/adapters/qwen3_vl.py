"""The Qwen3-VL adapter: ``Qwen3VLForConditionalGeneration``.

The Qwen-VL logic lives in :mod:`kvpress_mm.adapters.qwen_vl_base` (modality map from
``mm_token_type_ids``, M-RoPE checks) and :mod:`kvpress_mm.adapters.qwen_vl_prompts`
(placeholder runs, :func:`expand_vision_placeholders`).
Qwen3-VL differs in ways the shared code handles: each video frame is its own placeholder
run (``<vision_start>`` ... ``<vision_end>`` after a timestamp), its text attention has
``q_norm`` / ``k_norm`` (the compressor sees post-norm, post-RoPE keys anyway) and "deepstack"
adds vision features to the image positions' hidden states in the first decoder layers during
the prefill (before any cache entry is compressed).
"""

from __future__ import annotations

from typing import Any, ClassVar

from kvpress_mm.adapters.qwen_vl_base import QwenVLAdapter
from kvpress_mm.adapters.qwen_vl_prompts import expand_vision_placeholders
from kvpress_mm.hookspecs import hookimpl

__all__ = ["Qwen3VLAdapter", "expand_vision_placeholders"]


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL (Qwen3VLForConditionalGeneration): images and videos (one run per frame), multimodal RoPE."""

    family = "Qwen3-VL (Qwen3VLForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration",)


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the Qwen3-VL adapter."""
    register(Qwen3VLAdapter())
