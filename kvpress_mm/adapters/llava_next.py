"""The LLaVA-NeXT adapter: ``LlavaNextForConditionalGeneration``.

Image placeholders are ``config.image_token_id``; there are no delimiter tokens (the
``image_newline`` embedding at the end of each tile row is scattered into a placeholder
position like any image feature, so it counts as image). Each image takes a variable number
of placeholders ("anyres"): the base tile, plus the grid of high-resolution tiles picked from
``config.image_grid_pinpoints`` for its original size (``image_sizes``), with the padding rows
or columns removed, plus one newline per row. A prompt whose placeholders do not match its
images is refused before the text decoder runs: under ``generate`` the counts are read from the
image features it computes first (``pixel_values`` / ``image_sizes`` are checked before the
vision tower runs); in a plain forward they are computed from ``image_sizes`` with transformers'
own anyres helpers, before anything runs.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from kvpress_mm.adapters.llava import feature_select_strategy, tokens_per_tile
from kvpress_mm.adapters.vlm import CountCheckedAdapter
from kvpress_mm.errors import InvalidInputError
from kvpress_mm.hookspecs import hookimpl


def anyres_num_tiles(model: nn.Module, image_size: Sequence[int]) -> int:
    """Tiles (base tile included) the model reads from ``pixel_values`` for an image of ``(H, W)``."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config: Any = model.config
    tile = int(config.vision_config.image_size)
    return int(image_size_to_num_patches([int(x) for x in image_size], config.image_grid_pinpoints, tile))


def anyres_image_token_count(
    model: nn.Module,
    image_size: Sequence[int],
    strategy: str,
    *,
    tiled: bool = True,
    max_num_patches: int | None = None,
) -> int | None:
    """Placeholders of one image of original size ``image_size = (H, W)``, as the model packs it.

    Mirrors ``pack_image_features`` of LLaVA-NeXT / LLaVA-OneVision: the base tile's tokens,
    then the unpadded grid of tile features with one ``image_newline`` per row. ``tiled=False``
    is OneVision's multi-image case (base tile and one newline only). ``max_num_patches``
    (OneVision's ``anyres_max_N``) downsamples a grid larger than ``N`` tiles.

    Returns ``None`` when the vision tower's token layout is unknown.
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    config: Any = model.config
    vision = config.vision_config
    tile = int(vision.image_size)
    base = tokens_per_tile(model, tile, tile, strategy)
    if base is None:
        return None
    if not tiled:
        return base + 1
    side = tile // int(vision.patch_size)
    size = [int(x) for x in image_size]
    rows, cols = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, tile)
    # the model's own unpadding, on an empty tensor of the grid's shape
    height, width = unpad_image(torch.empty(0, rows * side, cols * side), size).shape[1:]
    if max_num_patches is not None:
        ratio = math.sqrt(height * width / (max_num_patches * side**2))
        if ratio > 1.1:
            height, width = int(height // ratio), int(width // ratio)
    return base + int(height) * (int(width) + 1)


def check_anyres_pixels(model: nn.Module, pixel_values: torch.Tensor, image_sizes: Any, tiles: Sequence[int]) -> None:
    """Refuse ``pixel_values`` that do not hold the tiles ``image_sizes`` call for."""
    n_images = len(tiles)
    if pixel_values.dim() == 5:
        if int(pixel_values.shape[0]) != n_images:
            raise InvalidInputError(
                f"pixel_values holds {int(pixel_values.shape[0])} images but image_sizes describes {n_images}; "
                "give one (height, width) row per image"
            )
        if n_images and int(pixel_values.shape[1]) < max(tiles):
            raise InvalidInputError(
                f"pixel_values holds {int(pixel_values.shape[1])} tiles per image, but image_sizes "
                f"{[list(map(int, s)) for s in image_sizes]} need {list(tiles)}: preprocess the images with "
                "the model's image processor (same image_grid_pinpoints as the model config)"
            )
    elif pixel_values.dim() == 4:
        if int(pixel_values.shape[0]) != sum(tiles):
            raise InvalidInputError(
                f"pixel_values holds {int(pixel_values.shape[0])} tiles, but image_sizes "
                f"{[list(map(int, s)) for s in image_sizes]} need {list(tiles)} (total {sum(tiles)})"
            )
    else:
        raise InvalidInputError(f"pixel_values must be 4-D or 5-D, got shape {tuple(pixel_values.shape)}")


def image_sizes_list(image_sizes: Any) -> list[list[int]]:
    """``image_sizes`` (tensor, array or nested list) as a list of ``[H, W]`` ints."""
    if isinstance(image_sizes, torch.Tensor):
        image_sizes = image_sizes.tolist()
    return [[int(x) for x in size] for size in image_sizes]


class LlavaNextAdapter(CountCheckedAdapter):
    """LLaVA-NeXT (LlavaNextForConditionalGeneration): image placeholders are ``config.image_token_id``.

    Inputs are checked before the prefill: each image takes exactly its anyres placeholder
    count (each row a whole number of images), read from the image features ``generate``
    computes before the prefill (``mm_encoder_outputs``); in a plain forward, ``pixel_values``
    need ``image_sizes``, the tiles must be those ``image_sizes`` call for, and the counts are
    computed from ``image_sizes``.
    """

    family = "LLaVA-NeXT (LlavaNextForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaNextForConditionalGeneration",)
    video_inputs: ClassVar[tuple[str, ...]] = ()

    def image_token_counts(self, model: nn.Module, inputs: Mapping[str, Any]) -> list[int] | None:
        """Placeholders of each image of the call (``None`` if the tower's layout is unknown)."""
        sizes = image_sizes_list(inputs["image_sizes"])
        strategy = feature_select_strategy(model, inputs)
        counts = [anyres_image_token_count(model, size, strategy) for size in sizes]
        return None if any(c is None for c in counts) else [int(c) for c in counts if c is not None]

    def image_tiles(self, model: nn.Module, inputs: Mapping[str, Any]) -> list[int]:
        """Tiles the model reads from ``pixel_values`` for each image."""
        return [anyres_num_tiles(model, size) for size in image_sizes_list(inputs["image_sizes"])]

    def check_pixels(self, model: nn.Module, inputs: Mapping[str, Any]) -> None:
        """``pixel_values`` come with ``image_sizes``, and hold the tiles those call for."""
        pixel_values = inputs.get("pixel_values")
        if not isinstance(pixel_values, torch.Tensor):
            return
        if inputs.get("image_sizes") is None:
            raise InvalidInputError(
                f"{type(model).__name__} needs image_sizes (each image's original (height, width)) with "
                "pixel_values; the image processor returns both"
            )
        check_anyres_pixels(model, pixel_values, inputs["image_sizes"], self.image_tiles(model, inputs))

    def instrument(self, model: nn.Module) -> Callable[[], None] | None:
        """Check the pixel inputs when the model encodes them.

        ``generate`` runs the vision encoder (``get_image_features``) before the first forward,
        where inconsistent ``pixel_values`` / ``image_sizes`` fail with bare shape errors; the
        checks of :meth:`check_pixels` run first, with clear messages.
        """
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "get_image_features") or "get_image_features" in vars(inner):
            return None
        original = inner.get_image_features
        parameters = list(inspect.signature(original).parameters)

        @functools.wraps(original)  # generate reads the signature to pick the encoder's inputs
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            self.check_pixels(model, {**dict(zip(parameters, args)), **kwargs})
            return original(*args, **kwargs)

        inner.get_image_features = get_image_features

        def undo() -> None:
            if vars(inner).get("get_image_features") is get_image_features:
                del inner.get_image_features

        return undo

    def check_images(self, model: nn.Module, inputs: Mapping[str, Any], orphans: bool) -> None:
        """The call's image placeholders against its images (features, or pixels and ``image_sizes``)."""

        def from_pixels(pixel_values: torch.Tensor) -> tuple[list[int], str] | None:
            self.check_pixels(model, inputs)
            counts = self.image_token_counts(model, inputs)
            if counts is None:
                return None
            return counts, f"image_sizes {image_sizes_list(inputs['image_sizes'])} give images of {counts} tokens"

        self.check_image_placeholders(model, inputs, from_pixels, orphans=orphans)


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the LLaVA-NeXT adapter."""
    register(LlavaNextAdapter())
