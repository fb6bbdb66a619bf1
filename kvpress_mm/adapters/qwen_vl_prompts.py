"""The Qwen-VL prompt layout: vision placeholder runs, their grids, token types, and prompt expansion.

A Qwen-VL prompt wraps each image as ``<vision_start>`` + ``t*h*w / merge_size**2`` image
placeholder tokens + ``<vision_end>`` (``t, h, w`` the image's row of ``image_grid_thw``, in
patches before the ``merge_size x merge_size`` merge); videos likewise with the video token and
``video_grid_thw``. Qwen3-VL writes each video frame as its own ``<vision_start>`` ... ``<vision_end>``
run (preceded by a timestamp in text). ``mm_token_type_ids`` (0 text, 1 image, 2 video) mark the
placeholders; the delimiters are text.

``Qwen2VLProcessor`` and its siblings need a video processor, hence torchvision;
:func:`expand_vision_placeholders` does their prompt expansion for use with the PIL image
processor (``Qwen2VLImageProcessorPil``). The ``check_*`` functions refuse inputs whose layout
disagrees with their grids, with messages that say how to build them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvpress_mm.errors import InvalidInputError
from kvpress_mm.modality import Modality

#: ``mm_token_type_ids`` codes (transformers' convention).
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2

#: Model types whose videos are written one placeholder run per frame (with a timestamp before each).
FRAME_RUN_MODEL_TYPES = frozenset({"qwen3_vl"})

HOW_TO_BUILD = (
    "the Qwen processor returns them with input_ids (pass all of its output); without a processor, build "
    "input_ids and mm_token_type_ids with kvpress_mm.adapters.qwen2_vl.expand_vision_placeholders"
)


def grid_rows(grid: Any, name: str) -> list[tuple[int, int, int]]:
    """``image_grid_thw`` / ``video_grid_thw`` (tensor or nested sequence) as ``(t, h, w)`` tuples."""
    rows = grid.tolist() if isinstance(grid, torch.Tensor) else [list(row) for row in grid]
    if any(len(row) != 3 for row in rows):
        raise InvalidInputError(f"{name} must have shape [n, 3] (t, h, w per item), got {rows}")
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def placeholder_runs(grid: Sequence[tuple[int, int, int]], merge_size: int, frames_separate: bool) -> list[int]:
    """Placeholder tokens of each contiguous run the grid calls for, in prompt order.

    An item of grid ``(t, h, w)`` takes ``t*h*w / merge_size**2`` tokens in one run, or, with
    ``frames_separate`` (Qwen3-VL videos), ``t`` runs of ``h*w / merge_size**2``.

    >>> placeholder_runs([(1, 4, 6), (2, 2, 2)], 2, frames_separate=False)
    [6, 2]
    >>> placeholder_runs([(2, 2, 2)], 2, frames_separate=True)
    [1, 1]
    """
    runs: list[int] = []
    for t, h, w in grid:
        if frames_separate:
            runs += [h * w // merge_size**2] * t
        else:
            runs.append(t * h * w // merge_size**2)
    return runs


def video_frames_separate(config: Any) -> bool:
    """True if the model writes each video frame as its own placeholder run (Qwen3-VL)."""
    return str(getattr(config, "model_type", "")) in FRAME_RUN_MODEL_TYPES


def runs_per_row(is_placeholder: torch.Tensor) -> list[list[int]]:
    """Lengths of the contiguous ``True`` runs of each row of a ``[batch, seq]`` bool tensor."""
    result = []
    for row in is_placeholder.to(torch.int8).cpu():
        edges = torch.diff(row, prepend=row.new_zeros(1), append=row.new_zeros(1))
        starts = (edges == 1).nonzero().flatten()
        ends = (edges == -1).nonzero().flatten()
        result.append((ends - starts).tolist())
    return result


def as_token_rows(input_ids: Any, attention_mask: Any) -> list[list[int]]:
    """Prompt rows as lists of ids, padding (``attention_mask == 0``) removed."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
        if attention_mask is not None:
            keep = torch.as_tensor(attention_mask).reshape(ids.shape).bool()
            return [row[k].tolist() for row, k in zip(ids.cpu(), keep.cpu())]
        return [row.tolist() for row in ids.cpu()]
    rows = list(input_ids)
    if rows and not isinstance(rows[0], (Sequence, torch.Tensor)):
        rows = [rows]  # one prompt as a flat list of ids
    if attention_mask is not None:
        raise ValueError("attention_mask is only accepted with a 2-D input_ids tensor")
    return [[int(t) for t in row] for row in rows]


def expand_vision_placeholders(
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None,
    video_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None,
    config: Any,
    *,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Build a Qwen-VL prompt without the (torchvision-bound) processor.

    Each single image placeholder token (``config.image_token_id``) in ``input_ids`` becomes
    ``t*h*w / merge_size**2`` of them, for the image's row of ``image_grid_thw`` (images are
    numbered in prompt order, row after row, as the image processor returns them); video
    placeholders likewise with ``video_grid_thw``. For Qwen3-VL (``config.model_type ==
    "qwen3_vl"``) each video frame becomes its own ``<vision_start>`` + placeholders +
    ``<vision_end>`` run inside the prompt's pair, as ``Qwen3VLProcessor`` writes it, minus the
    ``"<t seconds>"`` timestamp text it puts before each frame (that needs the tokenizer). Rows
    are then left-padded to a common length.

    ```python
    from transformers import Qwen2VLImageProcessorPil  # the PIL backend: no torchvision needed

    # patch_size 14 for Qwen2-VL / Qwen2.5-VL, 16 for Qwen3-VL (model.config.vision_config.patch_size)
    pixels = Qwen2VLImageProcessorPil(patch_size=14)(images=[image], return_tensors="pt")
    ids = [bos, *text_ids, vision_start, image_token_id, vision_end, *more_text_ids]
    inputs = {**pixels, **expand_vision_placeholders(ids, pixels["image_grid_thw"], None, model.config)}
    model.generate(**inputs, max_new_tokens=32)
    ```

    Args:
        input_ids: one prompt (a list of ids or a 1-D tensor), several (a list of lists, or a
            2-D tensor, padded where ``attention_mask`` is 0), with one placeholder per item.
        image_grid_thw: ``[n_images, 3]`` grids from the image processor, or ``None``.
        video_grid_thw: ``[n_videos, 3]`` grids, or ``None``.
        config: the model's config (or the model).
        attention_mask: for a padded 2-D ``input_ids`` tensor: which tokens are real.
        pad_token_id: id used for left padding; defaults to the text config's ``pad_token_id``
            (0 if it has none).

    Returns:
        ``input_ids`` ``[batch, seq]``, ``attention_mask`` (0 on the left padding) and
        ``mm_token_type_ids`` (0 text and padding, 1 image, 2 video), all ``torch.long``.

    Raises:
        ValueError: the placeholders and the grids do not describe the same number of items,
            or a grid is not a whole number of ``merge_size x merge_size`` blocks.

    """
    config = getattr(config, "config", config)  # a model was passed
    merge = int(config.vision_config.spatial_merge_size)
    frames_separate = video_frames_separate(config)
    image_id, video_id = int(config.image_token_id), int(config.video_token_id)
    start_id, end_id = int(config.vision_start_token_id), int(config.vision_end_token_id)
    grids = {
        image_id: grid_rows(image_grid_thw, "image_grid_thw") if image_grid_thw is not None else [],
        video_id: grid_rows(video_grid_thw, "video_grid_thw") if video_grid_thw is not None else [],
    }
    for items in grids.values():
        for t, h, w in items:
            if min(t, h, w) <= 0 or h % merge or w % merge:
                raise ValueError(
                    f"grid (t={t}, h={h}, w={w}) is not a whole number of {merge}x{merge} blocks: h and w must be "
                    f"positive multiples of merge_size {merge}"
                )
    rows = as_token_rows(input_ids, attention_mask)
    for token, name in ((image_id, "image"), (video_id, "video")):
        found = sum(row.count(token) for row in rows)
        if found != len(grids[token]):
            raise ValueError(
                f"the prompt has {found} {name} placeholder(s) (id {token}) but the {name} grid describes "
                f"{len(grids[token])} {name}(s); write one placeholder per {name}"
            )
    next_item = {image_id: iter(grids[image_id]), video_id: iter(grids[video_id])}
    expanded: list[list[int]] = []
    for row in rows:
        out: list[int] = []
        for token in row:
            if token not in next_item:
                out.append(token)
                continue
            t, h, w = next(next_item[token])
            if token == video_id and frames_separate:
                # Qwen3VLProcessor: one <vision_start> frame <vision_end> per frame, inside the prompt's own pair
                out += [start_id, *[video_id] * (h * w // merge**2), end_id] * t
            else:
                out += [token] * (t * h * w // merge**2)
        expanded.append(out)
    if pad_token_id is None:
        pad_token_id = getattr(config.get_text_config(), "pad_token_id", None)
    pad = 0 if pad_token_id is None else int(pad_token_id)
    width = max(len(row) for row in expanded)
    ids = torch.full((len(expanded), width), pad, dtype=torch.long)
    mask = torch.zeros(len(expanded), width, dtype=torch.long)
    for b, row in enumerate(expanded):
        if row:
            ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[b, width - len(row) :] = 1
    types = torch.zeros_like(ids)
    types[(ids == image_id) & (mask == 1)] = IMAGE_TYPE
    types[(ids == video_id) & (mask == 1)] = VIDEO_TYPE
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}


def check_grid(config: Any, token_id: int, code: Modality, input_ids: torch.Tensor, grid: Any, pixels: Any) -> None:
    """The pixels fill the grid; one placeholder run of ``t*h*w / merge**2`` tokens per grid row."""
    merge = int(config.vision_config.spatial_merge_size)
    what = code.name.lower()
    grid_name = f"{what}_grid_thw"
    rows = grid_rows(grid, grid_name)
    bad = [list(row) for row in rows if min(row) <= 0 or row[1] % merge or row[2] % merge]
    if bad:
        raise InvalidInputError(
            f"{grid_name} rows {bad} are not whole {merge}x{merge} blocks (t, h and w must be positive, h and w "
            f"multiples of spatial_merge_size {merge})"
        )
    patches = sum(t * h * w for t, h, w in rows)
    if isinstance(pixels, torch.Tensor) and pixels.dim() == 2 and int(pixels.shape[0]) != patches:
        raise InvalidInputError(
            f"the {what} pixels hold {int(pixels.shape[0])} patches but {grid_name} {[list(r) for r in rows]} "
            f"needs sum(t*h*w) = {patches}"
        )
    frames_separate = code == Modality.VIDEO and video_frames_separate(config)
    source = f"{grid_name} {[list(r) for r in rows]} (t*h*w/merge_size^2 tokens per {what})"
    check_runs(config, token_id, code, input_ids, placeholder_runs(rows, merge, frames_separate), source)


def check_runs(
    config: Any, token_id: int, code: Modality, input_ids: torch.Tensor, expected: list[int], source: str
) -> None:
    """The placeholder runs of ``input_ids``, row after row, are ``expected`` (in order)."""
    what = code.name.lower()
    found = runs_per_row(input_ids == token_id)
    if [n for row in found for n in row] == expected:
        return
    frames_separate = code == Modality.VIDEO and video_frames_separate(config)
    if frames_separate and "grid" not in source and sum(map(sum, found)) == sum(expected):
        return  # per-video feature counts cannot tell where the frames split
    unit = f"{what} frame" if frames_separate else what
    raise InvalidInputError(
        f"{source} call(s) for {what} placeholder runs of {expected} tokens ({sum(expected)} in all, one "
        f"contiguous run per {unit}, in prompt order), but input_ids hold {sum(map(sum, found))} {what} "
        f"placeholder tokens (id {token_id}) in runs of {found} (per row). Each {unit}'s single placeholder "
        f"must be expanded into t*h*w/merge_size^2 tokens: {HOW_TO_BUILD}"
    )


def check_token_types(ids: Mapping[Modality, int], input_ids: torch.Tensor, types: Any) -> None:
    """``mm_token_type_ids`` of the shape of ``input_ids``, 1 / 2 exactly on the image / video ids."""
    if not isinstance(types, torch.Tensor) or tuple(types.shape) != tuple(input_ids.shape):
        shape = tuple(types.shape) if isinstance(types, torch.Tensor) else type(types).__name__
        raise InvalidInputError(
            f"mm_token_type_ids must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}. "
            "(On a compressed cache, pass mm_token_type_ids only for the new tokens, or none.)"
        )
    types = types.to(input_ids.device)
    unknown = sorted(set(types[(types < TEXT_TYPE) | (types > VIDEO_TYPE)].tolist()))
    if unknown:
        raise InvalidInputError(f"mm_token_type_ids hold {unknown}; Qwen-VL uses 0 text, 1 image, 2 video")
    for code, type_code in ((Modality.IMAGE, IMAGE_TYPE), (Modality.VIDEO, VIDEO_TYPE)):
        what = code.name.lower()
        wrong = ((types == type_code) != (input_ids == ids[code])).nonzero()
        if wrong.numel():
            where = [tuple(p) for p in wrong[:5].tolist()]
            raise InvalidInputError(
                f"mm_token_type_ids disagree with input_ids at (row, position) {where}"
                f"{' ...' if wrong.shape[0] > 5 else ''}: {type_code} must mark exactly the {what} placeholder "
                f"tokens (id {ids[code]}); Qwen computes M-RoPE positions from mm_token_type_ids but places the "
                f"{what} features by id. Use the mm_token_type_ids that came with these input_ids: {HOW_TO_BUILD}"
            )
