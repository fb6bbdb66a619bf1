"""Placeholder-count checks shared by the vision-language adapters.

A vision-language model scatters its image (video) features into the positions of the
placeholder tokens in ``input_ids``, in order. When the number of placeholders differs from
the number of features, the model either raises deep inside its forward or, worse, runs on
misaligned inputs. The adapters compute the expected counts cheaply from the inputs (pixel
shapes, ``image_sizes``, the config) and check them here, before anything runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kvpress_mm.errors import InvalidInputError


def count_tokens(input_ids: torch.Tensor, token_id: int) -> tuple[int, list[int]]:
    """``(total, per_row)`` occurrences of ``token_id`` in ``input_ids`` ``[batch, seq]``."""
    per_row = (input_ids == token_id).sum(-1)
    rows = [int(n) for n in per_row.tolist()]
    return sum(rows), rows


def has_encoder_outputs(inputs: Mapping[str, Any], key: str) -> bool:
    """True if the call brings precomputed vision features (``mm_encoder_outputs[key]``)."""
    outputs = inputs.get("mm_encoder_outputs")
    return isinstance(outputs, Mapping) and outputs.get(key) is not None


def check_placeholder_count(
    input_ids: torch.Tensor,
    token_id: int,
    item_counts: Sequence[int],
    *,
    what: str,
    source: str,
    item: str | None = None,
) -> None:
    """Raise :class:`InvalidInputError` unless ``input_ids`` hold the placeholders of ``item_counts``.

    The model fills the placeholders with the items' features in order, row after row, so
    the total must be ``sum(item_counts)`` and every row must end on an item boundary (an
    image's placeholders cannot straddle two rows).

    Args:
        input_ids: ``[batch, seq]`` token ids of the prompt.
        token_id: the placeholder token id.
        item_counts: placeholders of each image (or tile, or video), in order.
        what: ``"image"`` or ``"video"`` (for the message).
        source: how the counts were derived, e.g. ``"pixel_values holds 3 images of 4 tokens each"``.
        item: what ``item_counts`` counts, when not whole ``what``s (e.g. ``"tile"``).

    """
    expected = sum(item_counts)
    total, rows = count_tokens(input_ids, token_id)
    if total != expected:
        raise InvalidInputError(
            f"{source}, so input_ids need {expected} {what} placeholder tokens (id {token_id}), but they contain "
            f"{total} (per row: {rows}). Build the prompt with the model's processor, which expands each {what} "
            f"into exactly as many placeholders as it has features"
        )
    boundaries = set(itertools.accumulate(item_counts, initial=0))
    ends = list(itertools.accumulate(rows))
    bad = [b for b, end in enumerate(ends) if end not in boundaries]
    if bad:
        unit = item or what
        raise InvalidInputError(
            f"row(s) {bad} of input_ids end in the middle of a {unit}'s placeholders: the rows hold {rows} "
            f"{what} placeholder tokens (id {token_id}) and the {unit}s take {list(item_counts)}, in order. "
            f"Each {unit}'s placeholders must all be in one row"
        )


def check_no_orphan_placeholders(input_ids: torch.Tensor, token_id: int, *, what: str, inputs_name: str) -> None:
    """Raise :class:`InvalidInputError` if ``input_ids`` hold placeholders but no pixels came with them.

    The model would embed the placeholders as ordinary tokens while the modality map marks
    them as ``what`` entries: a prompt that cannot mean what it says.
    """
    total, rows = count_tokens(input_ids, token_id)
    if total:
        raise InvalidInputError(
            f"input_ids contain {total} {what} placeholder tokens (id {token_id}; per row: {rows}) but the call "
            f"has no {inputs_name}: pass the {what}s the placeholders stand for, or remove the placeholders"
        )


def encoder_item_counts(inputs: Mapping[str, Any], key: str) -> list[int] | None:
    """Features of each item in precomputed vision features ``mm_encoder_outputs[key]``.

    transformers' ``generate`` (5.24+) runs the vision encoder before the first forward and
    passes its output instead of the pixels; ``pooler_output`` then holds each image's (tile's,
    video's) projected features: a list of ``[tokens, dim]`` tensors, or one
    ``[items, tokens, dim]`` tensor. ``None`` when the layout is not one of those.
    """
    outputs = inputs.get("mm_encoder_outputs")
    output = outputs.get(key) if isinstance(outputs, Mapping) else None
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, (list, tuple)) and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in pooled):
        return [int(t.shape[0]) for t in pooled]
    if isinstance(pooled, torch.Tensor) and pooled.dim() == 3:
        return [int(pooled.shape[1])] * int(pooled.shape[0])
    return None


#: From a call's pixel tensor: ``(placeholders of each item, how they were derived)``, or ``None``.
PixelCounter = Callable[[torch.Tensor], "tuple[list[int], str] | None"]


def check_media_placeholders(
    input_ids: torch.Tensor,
    token_id: int,
    inputs: Mapping[str, Any],
    *,
    what: str,
    key: str,
    pixels_name: str,
    from_pixels: PixelCounter,
    item: str | None = None,
    orphans: bool = True,
) -> None:
    """Check a call's ``what`` placeholders against the features the model will scatter into them.

    With precomputed features (``mm_encoder_outputs[key]``, what ``generate`` passes) the
    counts are read from them; with raw pixels (``inputs[pixels_name]``, a plain forward) they
    come from ``from_pixels``. Without either, placeholders are refused when ``orphans``.

    Args:
        input_ids: ``[batch, seq]`` token ids of the call.
        token_id: the placeholder token id.
        inputs: the call's keyword inputs.
        what: ``"image"`` or ``"video"``.
        key: the ``mm_encoder_outputs`` key (``"image"`` / ``"video"``).
        pixels_name: the raw pixel input (``"pixel_values"``, ``"pixel_values_videos"``).
        from_pixels: derives each item's placeholder count from the pixel tensor (``None``:
            cannot tell, the model checks the count itself).
        item: what one count covers when not a whole ``what`` (``"tile"``).
        orphans: refuse placeholders that come without pixels or features.

    """
    if has_encoder_outputs(inputs, key):
        counts = encoder_item_counts(inputs, key)
        if counts is not None:
            unit = item or what
            check_placeholder_count(
                input_ids,
                token_id,
                counts,
                what=what,
                item=item,
                source=f"the {what} features (mm_encoder_outputs[{key!r}]) hold {len(counts)} {unit}(s) of "
                f"{counts} tokens",
            )
        return
    pixels = inputs.get(pixels_name)
    if not isinstance(pixels, torch.Tensor):
        if orphans:
            check_no_orphan_placeholders(input_ids, token_id, what=what, inputs_name=pixels_name)
        return
    derived = from_pixels(pixels)
    if derived is not None:
        counts, source = derived
        check_placeholder_count(input_ids, token_id, counts, what=what, source=source, item=item)


def continues_where_cache_stands(inputs: Mapping[str, Any], next_positions: torch.Tensor) -> bool:
    """False if a call on a compressed cache visibly starts elsewhere than where it stands.

    ``generate(full_history, cache=compressed)`` re-feeds tokens the cache has seen; the
    session refuses such a call with its own message, so an adapter's checks of the call's
    images (which would report a confusing placeholder count first) can stand aside.
    """
    position_ids = inputs.get("position_ids")
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] == 0:
        return True
    first = position_ids[:, 0].to(next_positions.device)
    if first.shape[0] not in (1, next_positions.shape[0]):
        return True
    return bool((first == next_positions).all())
