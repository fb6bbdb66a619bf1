"""Shared machinery of the vision-language adapters: placeholder tokens mark image/video entries.

A vision-language model's text decoder sees one embedding per placeholder token: the image
token id (``config.image_token_id``) marks an image feature, the video token id a video
feature. Those positions are ``IMAGE`` / ``VIDEO`` in the modality map; everything else,
vision delimiters (``<vision_start>``, ``<img>``, ...) included, is ``TEXT``; padding is
``PADDING``. No tokens-per-image count is assumed: the map comes from the inputs themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kvpress_mm.adapters.base import ModelAdapter, padding_aware_text_map
from kvpress_mm.adapters.placeholders import PixelCounter, check_media_placeholders, continues_where_cache_stands
from kvpress_mm.errors import InvalidInputError
from kvpress_mm.modality import Modality


def _config(model: nn.Module) -> Any:
    return model.config


class VisionLanguageAdapter(ModelAdapter):
    """Base of the adapters for transformers' ``*ForConditionalGeneration`` vision-language models.

    Subclasses name their model classes and, where it differs, how inputs are checked.
    """

    #: Names of the transformers classes this adapter claims (the class or one of its bases).
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: Input names that carry images / videos for this family.
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    video_inputs: ClassVar[tuple[str, ...]] = ()

    def supports(self, model: nn.Module) -> bool:
        """Claim the model if its class (or a base class) is one of ``model_classes``."""
        return any(cls.__name__ in self.model_classes for cls in type(model).__mro__)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The language model's ``layers[i].self_attn``."""
        decoder: Any = model.get_decoder()  # type: ignore[operator]
        return [layer.self_attn for layer in decoder.layers]

    def attention_implementation(self, model: nn.Module) -> str:
        """The text config's attention implementation (the vision tower keeps its own)."""
        return str(_config(model).get_text_config()._attn_implementation)

    def set_attention_implementation(self, model: nn.Module, implementation: str) -> None:
        """Switch the language model only; the vision tower is left alone."""
        model.set_attn_implementation({"text_config": implementation})  # type: ignore[operator]

    def token_ids(self, model: nn.Module) -> dict[Modality, int]:
        """Placeholder token id of each non-text modality."""
        config = _config(model)
        ids = {Modality.IMAGE: int(config.image_token_id)}
        video = getattr(config, "video_token_id", None)
        if video is not None:
            ids[Modality.VIDEO] = int(video)
        return ids

    def modality_map(self, model: nn.Module, inputs: Mapping[str, Any], seq_len: int) -> torch.Tensor:
        """Image / video placeholders from the token ids; delimiters are text; padding from the mask."""
        modality = padding_aware_text_map(inputs, seq_len)
        input_ids = inputs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor):
            return modality  # inputs_embeds only: validate_inputs made sure there are no images
        modality = modality.to(input_ids.device)
        real = modality != Modality.PADDING
        for code, token_id in self.token_ids(model).items():
            modality = modality.masked_fill((input_ids == token_id) & real, int(code))
        return modality

    def validate_inputs(self, model: nn.Module, inputs: Mapping[str, Any]) -> None:
        """Images need placeholder tokens in ``input_ids``; counts are checked per family."""
        input_ids = inputs.get("input_ids")
        for names, code, what in (
            (self.image_inputs, Modality.IMAGE, "image"),
            (self.video_inputs, Modality.VIDEO, "video"),
        ):
            given = [n for n in names if inputs.get(n) is not None]
            encoded = inputs.get("mm_encoder_outputs")
            if isinstance(encoded, Mapping) and encoded.get(what) is not None:
                # generate (transformers 5.24+) encodes the pixels first and passes these instead
                given.append(f"mm_encoder_outputs[{what!r}]")
            if not given:
                continue
            if not isinstance(input_ids, torch.Tensor):
                raise InvalidInputError(
                    f"{given[0]} given with inputs_embeds only: kvpress-mm needs input_ids to find the {what} "
                    "placeholder positions"
                )
            token_id = self.token_ids(model).get(code)
            if token_id is None or not bool((input_ids == token_id).any()):
                raise InvalidInputError(
                    f"{given[0]} given but input_ids contain no {what} placeholder token (id {token_id}); "
                    f"build the prompt with the model's processor, which expands each {what} into its placeholders"
                )


class CountCheckedAdapter(VisionLanguageAdapter):
    """A vision-language adapter that checks each call's placeholder counts against its media.

    Subclasses implement :meth:`check_images`; it runs on every prefill and on calls that add
    images to a compressed cache.
    """

    def validate_inputs(self, model: nn.Module, inputs: Mapping[str, Any]) -> None:
        """Images need placeholders, the counts must match, and placeholders need images."""
        super().validate_inputs(model, inputs)
        self.check_images(model, inputs, orphans=True)

    def validate_continuation(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        record: Mapping[str, Any],
        next_positions: torch.Tensor,
        new_valid: torch.Tensor,
    ) -> None:
        """Images added on a compressed cache must match their placeholders too.

        (Placeholder ids without images are not refused here: a generated token may be one.)
        """
        if continues_where_cache_stands(inputs, next_positions):
            self.check_images(model, inputs, orphans=False)

    def check_images(self, model: nn.Module, inputs: Mapping[str, Any], orphans: bool) -> None:
        """Raise :class:`~kvpress_mm.errors.InvalidInputError` when placeholders and media disagree.

        ``orphans``: also refuse placeholder tokens that come with no media (prefill only).
        """
        raise NotImplementedError

    def check_image_placeholders(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        from_pixels: PixelCounter,
        *,
        orphans: bool,
        item: str | None = None,
    ) -> None:
        """The call's image placeholders (``config.image_token_id``) against its ``pixel_values`` images.

        The part of :meth:`check_images` the families share; ``from_pixels`` is theirs. The counts
        come from the image features ``generate`` computes before the prefill
        (``mm_encoder_outputs``), else from ``from_pixels(pixel_values)`` (a plain forward); see
        :func:`~kvpress_mm.adapters.placeholders.check_media_placeholders`, which also takes
        ``orphans`` and ``item`` (what one count covers, e.g. ``"tile"``). A call without
        ``input_ids`` is not checked.
        """
        input_ids = inputs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor):
            return
        check_media_placeholders(
            input_ids,
            int(_config(model).image_token_id),
            inputs,
            what="image",
            key="image",
            pixels_name="pixel_values",
            from_pixels=from_pixels,
            item=item,
            orphans=orphans,
        )
