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

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kvpress_mm.adapters.qwen_vl_base import QwenVLAdapter
from kvpress_mm.adapters.qwen_vl_prompts import expand_vision_placeholders
from kvpress_mm.hookspecs import hookimpl

__all__ = ["Qwen3VLAdapter", "expand_vision_placeholders"]


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL (Qwen3VLForConditionalGeneration): images and videos (one run per frame), multimodal RoPE."""

    family = "Qwen3-VL (Qwen3VLForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration",)

    def split_decoder_inputs(self, model: nn.Module, inputs: Mapping[str, Any], start: int, end: int) -> dict[str, Any]:
        """Deepstack: the image/video positions of the chunk and their rows of each layer's features.

        The text decoder adds ``deepstack_visual_embeds[l]`` (one row per ``True`` of
        ``visual_pos_masks [batch, seq]``, in row-major order) to the hidden states of layer
        ``l``; a chunk gets its own positions' rows.
        """
        positions, features = inputs.get("visual_pos_masks"), inputs.get("deepstack_visual_embeds")
        if not isinstance(positions, torch.Tensor) or features is None:
            return {}
        chunk = positions[:, start:end]
        if not bool(chunk.any()):
            return {"visual_pos_masks": None, "deepstack_visual_embeds": None}
        rows = positions.flatten().long().cumsum(0).view_as(positions) - 1  # each visual position's row
        picked = rows[:, start:end][chunk]
        return {
            "visual_pos_masks": chunk,
            "deepstack_visual_embeds": [layer[picked.to(layer.device)] for layer in features],
        }


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the Qwen3-VL adapter."""
    register(Qwen3VLAdapter())
