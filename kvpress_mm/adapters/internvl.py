"""The InternVL adapter: ``InternVLForConditionalGeneration`` (transformers' native port).

An image is cut into tiles (``pixel_values`` ``[total_tiles, 3, H, W]``, the tiles of all
images stacked) and written in the prompt as ``<img>`` + ``<IMG_CONTEXT>`` x
(``image_seq_length`` * tiles) + ``</img>``. Only ``<IMG_CONTEXT>`` (``config.image_token_id``)
carries image features: ``<img>`` / ``</img>`` are TEXT in the modality map. Video frames
become images (one ``<img>...</img>`` per frame), so InternVL has no video modality.

``InternVLProcessor`` cannot be built without a video processor (which needs torchvision);
:func:`expand_image_placeholders` does its prompt expansion for use with the PIL image
processor (``GotOcr2ImageProcessorPil``, whose ``num_patches`` are the tiles per image).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, overload

import torch
from torch import nn

from kvpress_mm.adapters.vlm import CountCheckedAdapter
from kvpress_mm.hookspecs import hookimpl

IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"


@overload
def expand_image_placeholders(
    prompt: str,
    tiles_per_image: Sequence[int],
    image_seq_length: int,
    *,
    image_token: str | int = ...,
    start_token: str | int = ...,
    end_token: str | int = ...,
    placeholder: str | int | None = ...,
) -> str: ...


@overload
def expand_image_placeholders(
    prompt: Sequence[int],
    tiles_per_image: Sequence[int],
    image_seq_length: int,
    *,
    image_token: str | int = ...,
    start_token: str | int = ...,
    end_token: str | int = ...,
    placeholder: str | int | None = ...,
) -> list[int]: ...


def expand_image_placeholders(
    prompt: str | Sequence[int],
    tiles_per_image: Sequence[int],
    image_seq_length: int,
    *,
    image_token: str | int = IMAGE_CONTEXT_TOKEN,
    start_token: str | int = IMAGE_START_TOKEN,
    end_token: str | int = IMAGE_END_TOKEN,
    placeholder: str | int | None = None,
) -> str | list[int]:
    """Expand each image placeholder of an InternVL prompt as ``InternVLProcessor`` does.

    The ``i``-th ``placeholder`` becomes ``start_token`` + ``image_token`` x
    (``image_seq_length * tiles_per_image[i]``) + ``end_token``.

    >>> expand_image_placeholders("a <IMG_CONTEXT> b", [2], 1)
    'a <img><IMG_CONTEXT><IMG_CONTEXT></img> b'
    >>> expand_image_placeholders([5, 9, 6], [1], 2, image_token=9, start_token=7, end_token=8)
    [5, 7, 9, 9, 8, 6]

    Args:
        prompt: the prompt text, or its token ids, with one ``placeholder`` per image.
        tiles_per_image: tiles of each image, in prompt order (``num_patches`` from
            ``GotOcr2ImageProcessorPil``; the thumbnail tile included).
        image_seq_length: placeholders per tile (``model.config.image_seq_length``; 256 for
            the released checkpoints).
        image_token: the image context token (text), or its id when ``prompt`` is ids.
        start_token: the token opening an image (``<img>``), or its id.
        end_token: the token closing an image (``</img>``), or its id.
        placeholder: what marks an image in ``prompt``; defaults to ``image_token`` (the
            processor's convention: one ``<IMG_CONTEXT>`` per image in the raw text).

    Returns:
        The expanded text (``prompt`` a string) or list of token ids.

    Raises:
        ValueError: the number of placeholders differs from ``len(tiles_per_image)``, a tile
            count or ``image_seq_length`` is not positive, or the token types do not match
            the prompt's (strings for text, ints for ids).

    """
    if image_seq_length <= 0 or any(int(n) <= 0 for n in tiles_per_image):
        raise ValueError(
            f"image_seq_length ({image_seq_length}) and every tile count ({list(tiles_per_image)}) must be positive"
        )
    marker = image_token if placeholder is None else placeholder
    if isinstance(prompt, str):
        tokens = (image_token, start_token, end_token, marker)
        if not all(isinstance(t, str) for t in tokens):
            raise ValueError("a text prompt needs text tokens (image_token, start_token, end_token, placeholder)")
        pieces = prompt.split(str(marker))
        _check_image_count(len(pieces) - 1, tiles_per_image, repr(marker))
        out = [pieces[0]]
        for tiles, piece in zip(tiles_per_image, pieces[1:]):
            out.append(f"{start_token}{str(image_token) * (image_seq_length * int(tiles))}{end_token}{piece}")
        return "".join(out)
    ids = [int(t) for t in prompt]
    for token in (image_token, start_token, end_token, marker):
        if not isinstance(token, int) or isinstance(token, bool):
            raise ValueError("a prompt of token ids needs token ids (image_token, start_token, end_token, placeholder)")
    _check_image_count(ids.count(int(marker)), tiles_per_image, f"id {marker}")
    result: list[int] = []
    images = iter(tiles_per_image)
    for token in ids:
        if token == marker:
            context = [int(image_token)] * (image_seq_length * int(next(images)))
            result += [int(start_token), *context, int(end_token)]
        else:
            result.append(token)
    return result


def _check_image_count(found: int, tiles_per_image: Sequence[int], marker: str) -> None:
    if found != len(tiles_per_image):
        raise ValueError(
            f"the prompt has {found} image placeholder(s) ({marker}) but tiles_per_image describes "
            f"{len(tiles_per_image)} image(s)"
        )


def tokens_per_tile(model: nn.Module, height: int, width: int, strategy: str) -> int:
    """Placeholders of one ``height x width`` tile: the vision tower's patch grid after pixel shuffle.

    Mirrors ``InternVLModel.get_image_features``: ``(H / patch) * (W / patch)`` patch tokens
    (the CLS token dropped by ``"default"``), read as a square grid of side ``s`` and shuffled
    down to ``int(s * downsample_ratio)`` per side. ``(448 / 14)**2 * 0.5**2 = 256`` for the
    released checkpoints, ``config.image_seq_length``.
    """
    config: Any = model.config
    patch = config.vision_config.patch_size
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
    tokens = (height // patch_h) * (width // patch_w) + (0 if strategy == "default" else 1)
    side = int(int(tokens**0.5) * float(config.downsample_ratio))
    return side * side


class InternVLAdapter(CountCheckedAdapter):
    """InternVL (InternVLForConditionalGeneration): image placeholders are ``config.image_token_id``.

    ``<img>`` / ``</img>`` are text. Inputs are checked before the prefill: images need
    placeholders, exactly ``tokens_per_tile`` per tile (each row a whole number of tiles), and
    placeholders need images. The counts come from the image features ``generate`` computes
    before the prefill (``mm_encoder_outputs``), or from ``pixel_values`` in a plain forward.
    """

    family = "InternVL (InternVLForConditionalGeneration)"
    model_classes: ClassVar[tuple[str, ...]] = ("InternVLForConditionalGeneration",)
    video_inputs: ClassVar[tuple[str, ...]] = ()

    def check_images(self, model: nn.Module, inputs: Mapping[str, Any], orphans: bool) -> None:
        """The call's image placeholders against its tiles (features or pixels)."""

        def from_pixels(pixel_values: torch.Tensor) -> tuple[list[int], str] | None:
            config: Any = model.config
            strategy = inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
            height, width = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
            per_tile = tokens_per_tile(model, height, width, str(strategy))
            n_tiles = int(pixel_values.shape[0])
            return [per_tile] * n_tiles, f"pixel_values holds {n_tiles} tile(s) of {per_tile} tokens each"

        self.check_image_placeholders(model, inputs, from_pixels, orphans=orphans, item="tile")


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the InternVL adapter."""
    register(InternVLAdapter())
