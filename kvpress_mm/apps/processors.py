"""Torchvision-free processors for Qwen2-VL / Qwen2.5-VL / Qwen3-VL and InternVL.

transformers' ``Qwen2VLProcessor`` (and siblings) and ``InternVLProcessor`` cannot be built
without torchvision: they require a video processor. For images, what they do is small: run
the image processor (whose PIL backend needs no torchvision) and expand each image
placeholder of the prompt into the model's placeholder run. The classes here do exactly that
with the adapters' expansion helpers
(:func:`kvpress_mm.adapters.qwen2_vl.expand_vision_placeholders`,
:func:`kvpress_mm.adapters.internvl.expand_image_placeholders`), and offer the small part of
the processor interface the commands use: ``__call__(text=[...], images=[...])``,
``image_token``, ``tokenizer``, ``chat_template`` and ``apply_chat_template``. Videos are not
supported.

:func:`kvpress_mm.apps.models.load_model` falls back to them when ``AutoProcessor`` fails for
these families.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: Model types served here.
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
INTERNVL_TYPES = ("internvl",)


def _chat_template(directory: Path, tokenizer: Any) -> str | None:
    """The processor's chat template (``chat_template.jinja`` / ``.json``), else the tokenizer's."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    listing = directory / "chat_template.json"
    if listing.is_file():
        template = json.loads(listing.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


class _ImageOnlyProcessor:
    """The part of a transformers processor the commands use."""

    def __init__(self, tokenizer: Any, image_processor: Any, config: Any, chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.chat_template = chat_template
        self.image_token = str(tokenizer.convert_ids_to_tokens(int(config.image_token_id)))

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        """Render ``messages`` with the processor's chat template."""
        return self.tokenizer.apply_chat_template(list(messages), chat_template=self.chat_template, **kwargs)

    def _pixels(self, images: Sequence[Any] | None) -> dict[str, Any]:
        if not images:
            return {}
        return dict(self.image_processor(images=list(images), return_tensors="pt"))

    @staticmethod
    def _one(text: str | Sequence[str]) -> str:
        if isinstance(text, str):
            return text
        if len(text) != 1:
            raise ValueError("this processor takes one prompt at a time")
        return text[0]


class QwenVLImageProcessor(_ImageOnlyProcessor):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL prompts with images, without ``Qwen2VLProcessor``.

    An image placeholder (``<|image_pad|>``) in the text stands for one image; when it is not
    already between ``<|vision_start|>`` and ``<|vision_end|>`` (the chat template writes
    them), they are added around it. Returns ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids``, ``pixel_values`` and ``image_grid_thw``.
    """

    def __call__(
        self, text: str | Sequence[str], images: Sequence[Any] | None = None, return_tensors: str = "pt"
    ) -> dict[str, torch.Tensor]:
        """Tokenize, wrap and expand the image placeholders, and process the images."""
        from kvpress_mm.adapters.qwen2_vl import expand_vision_placeholders

        config = self.config
        image_id, start_id, end_id = (
            int(config.image_token_id),
            int(config.vision_start_token_id),
            int(config.vision_end_token_id),
        )
        ids = [int(t) for t in self.tokenizer(self._one(text)).input_ids]
        wrapped: list[int] = []
        for index, token in enumerate(ids):
            if token != image_id:
                wrapped.append(token)
                continue
            inside = index > 0 and ids[index - 1] == start_id and index + 1 < len(ids) and ids[index + 1] == end_id
            wrapped += [token] if inside else [start_id, token, end_id]
        pixels = self._pixels(images)
        expanded = expand_vision_placeholders(wrapped, pixels.get("image_grid_thw"), None, config)
        return {**expanded, **{k: v for k, v in pixels.items() if isinstance(v, torch.Tensor)}}


class InternVLImageProcessor(_ImageOnlyProcessor):
    """InternVL prompts with images, without ``InternVLProcessor``.

    Each ``<IMG_CONTEXT>`` in the text stands for one image and becomes ``<img>`` +
    ``<IMG_CONTEXT>`` x (``image_seq_length`` x tiles) + ``</img>``, the tiles counted by the
    image processor (``num_patches``). Returns ``input_ids``, ``attention_mask`` and
    ``pixel_values``.
    """

    def __call__(
        self, text: str | Sequence[str], images: Sequence[Any] | None = None, return_tensors: str = "pt"
    ) -> dict[str, torch.Tensor]:
        """Expand the image placeholders by the images' tiles, tokenize, and process the images."""
        from kvpress_mm.adapters.internvl import IMAGE_END_TOKEN, IMAGE_START_TOKEN, expand_image_placeholders

        prompt = self._one(text)
        pixels = self._pixels(images)
        tiles = [int(n) for n in pixels.pop("num_patches", [])] if pixels else []
        if tiles or self.image_token in prompt:
            prompt = expand_image_placeholders(
                prompt,
                tiles,
                int(self.config.image_seq_length),
                image_token=self.image_token,
                start_token=str(getattr(self.tokenizer, "start_image_token", None) or IMAGE_START_TOKEN),
                end_token=str(getattr(self.tokenizer, "end_image_token", None) or IMAGE_END_TOKEN),
            )
        batch = dict(self.tokenizer(prompt, return_tensors="pt"))
        return {**batch, **{k: v for k, v in pixels.items() if isinstance(v, torch.Tensor)}}


def image_only_processor(directory: Path, config: Any) -> Any:
    """The torchvision-free processor of a Qwen-VL or InternVL model directory.

    Raises:
        ValueError: the model type is not one of :data:`QWEN_VL_TYPES` / :data:`INTERNVL_TYPES`.
        Exception: whatever transformers raises when the tokenizer or image processor is missing.

    """
    from transformers import AutoImageProcessor, AutoTokenizer

    model_type = str(getattr(config, "model_type", ""))
    if model_type not in QWEN_VL_TYPES + INTERNVL_TYPES:
        raise ValueError(f"no torchvision-free processor for model_type {model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    try:
        image_processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True, backend="pil")
    except TypeError:  # transformers releases before the `backend` argument
        image_processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True, use_fast=False)
    cls = QwenVLImageProcessor if model_type in QWEN_VL_TYPES else InternVLImageProcessor
    return cls(tokenizer, image_processor, config, _chat_template(directory, tokenizer))
