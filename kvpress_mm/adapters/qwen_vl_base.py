"""What Qwen2-VL, Qwen2.5-VL and Qwen3-VL share: placeholders, M-RoPE checks, prompt expansion.

A Qwen-VL prompt wraps each image as ``<vision_start>`` + ``t*h*w / merge_size**2`` image
placeholder tokens + ``<vision_end>`` (``t, h, w`` the image's row of ``image_grid_thw``, in
patches before the ``merge_size x merge_size`` merge); videos likewise with the video token and
``video_grid_thw``. Qwen3-VL writes each video frame as its own ``<vision_start>`` ... ``<vision_end>``
run (preceded by a timestamp in text). ``mm_token_type_ids`` (0 text, 1 image, 2 video) mark the
placeholders; the delimiters are text.

Qwen's multimodal RoPE (M-RoPE) gives every image token a (t, h, w) position, so text after an
image continues at ``max(position) + 1``, which differs from the token count by the prompt's
"rope delta". transformers keeps that delta on the model (``model.model.rope_deltas``) and adds
it to the text positions while decoding. Three things here keep compression from going silently
wrong:

- prompts with images must bring ``mm_token_type_ids`` (without them ``generate`` computes
  text-only positions, silently), consistent with ``input_ids`` and with the image grids;
  these inputs are checked before transformers computes positions from them;
- the delta of each compressed prompt is recorded, and every later call on its cache must use
  positions that carry it (a stale ``model.model.rope_deltas`` left by another prompt raises);
- calls on a compressed cache cannot bring new images (their positions would be computed from
  the compressed cache length).

``Qwen2VLProcessor`` and its siblings need a video processor, hence torchvision;
:func:`expand_vision_placeholders` does their prompt expansion for use with the PIL image
processor (``Qwen2VLImageProcessorPil``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from kvpress_mm.adapters.base import padding_aware_text_map
from kvpress_mm.adapters.placeholders import check_no_orphan_placeholders, has_encoder_outputs
from kvpress_mm.adapters.vlm import VisionLanguageAdapter
from kvpress_mm.errors import InvalidInputError
from kvpress_mm.modality import Modality

#: ``mm_token_type_ids`` codes (transformers' convention).
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2

#: Inputs that bring images / videos into a Qwen-VL call (``image_grid_thw`` alone does not:
#: ``generate`` passes it again at every decoding step).
_MEDIA_INPUTS = ("pixel_values", "pixel_values_videos")
_MODALITIES = (
    (Modality.IMAGE, "pixel_values", "image_grid_thw"),
    (Modality.VIDEO, "pixel_values_videos", "video_grid_thw"),
)
#: Model types whose videos are written one placeholder run per frame (with a timestamp before each).
FRAME_RUN_MODEL_TYPES = frozenset({"qwen3_vl"})
_HOW_TO_BUILD = (
    "the Qwen processor returns them with input_ids (pass all of its output); without a processor, build "
    "input_ids and mm_token_type_ids with kvpress_mm.adapters.qwen2_vl.expand_vision_placeholders"
)


def _grid_rows(grid: Any, name: str) -> list[tuple[int, int, int]]:
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


def _encoder_output_sizes(inputs: Mapping[str, Any], what: str) -> list[int] | None:
    """Features per item of the call's precomputed ``mm_encoder_outputs[what]`` (``None`` if none)."""
    if not has_encoder_outputs(inputs, what):
        return None
    pooled = getattr(inputs["mm_encoder_outputs"][what], "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return [int(pooled.shape[0])]
    if isinstance(pooled, (list, tuple)) and all(isinstance(p, torch.Tensor) for p in pooled):
        return [int(p.shape[0]) for p in pooled]
    return None


def video_frames_separate(config: Any) -> bool:
    """True if the model writes each video frame as its own placeholder run (Qwen3-VL)."""
    return str(getattr(config, "model_type", "")) in FRAME_RUN_MODEL_TYPES


def _runs_per_row(is_placeholder: torch.Tensor) -> list[list[int]]:
    """Lengths of the contiguous ``True`` runs of each row of a ``[batch, seq]`` bool tensor."""
    result = []
    for row in is_placeholder.to(torch.int8).cpu():
        edges = torch.diff(row, prepend=row.new_zeros(1), append=row.new_zeros(1))
        starts = (edges == 1).nonzero().flatten()
        ends = (edges == -1).nonzero().flatten()
        result.append((ends - starts).tolist())
    return result


def _mrope_rows(position_ids: torch.Tensor) -> torch.Tensor:
    """The multimodal rows ``[3 or 1, B, q]`` the text decoder reads from ``position_ids``.

    Qwen's text model takes ``[4, B, q]`` (text row first), ``[3, B, q]``, ``[1, B, q]``
    (broadcast to 3 rows) or ``[B, q]`` (likewise).
    """
    if position_ids.dim() == 2:
        return position_ids[None]
    if position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return position_ids[1:]
    if position_ids.dim() == 3 and position_ids.shape[0] in (1, 3):
        return position_ids
    raise InvalidInputError(
        f"position_ids of shape {tuple(position_ids.shape)}: Qwen-VL models take [4, batch, seq] (text row, then "
        "the 3 multimodal RoPE rows), [3, batch, seq] or [batch, seq]"
    )


def _as_token_rows(input_ids: Any, attention_mask: Any) -> list[list[int]]:
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
        image_id: _grid_rows(image_grid_thw, "image_grid_thw") if image_grid_thw is not None else [],
        video_id: _grid_rows(video_grid_thw, "video_grid_thw") if video_grid_thw is not None else [],
    }
    for items in grids.values():
        for t, h, w in items:
            if min(t, h, w) <= 0 or h % merge or w % merge:
                raise ValueError(
                    f"grid (t={t}, h={h}, w={w}) is not a whole number of {merge}x{merge} blocks: h and w must be "
                    f"positive multiples of merge_size {merge}"
                )
    rows = _as_token_rows(input_ids, attention_mask)
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


class QwenVLAdapter(VisionLanguageAdapter):
    """Base of the Qwen2-VL, Qwen2.5-VL and Qwen3-VL adapters.

    The modality map comes from ``mm_token_type_ids`` when given (1 image, 2 video), else from
    the placeholder ids; ``<vision_start>`` / ``<vision_end>`` are text. Before the prefill (and
    before transformers computes M-RoPE positions from them) the inputs are checked: images
    need ``mm_token_type_ids`` consistent with ``input_ids``, and one run of ``t*h*w /
    merge_size**2`` placeholders per grid row. Calls on a compressed cache must carry the
    prompt's rope delta in their positions and bring no new images.
    """

    video_inputs: ClassVar[tuple[str, ...]] = ("pixel_values_videos",)

    # -- the modality map ------------------------------------------------------------------

    def modality_map(self, model: nn.Module, inputs: Mapping[str, Any], seq_len: int) -> torch.Tensor:
        """Image / video from ``mm_token_type_ids`` (else the placeholder ids); padding from the mask."""
        types = inputs.get("mm_token_type_ids")
        if not isinstance(types, torch.Tensor) or not isinstance(inputs.get("input_ids"), torch.Tensor):
            return super().modality_map(model, inputs, seq_len)
        modality = padding_aware_text_map(inputs, seq_len).to(types.device)
        real = modality != Modality.PADDING
        modality = modality.masked_fill((types == IMAGE_TYPE) & real, int(Modality.IMAGE))
        return modality.masked_fill((types == VIDEO_TYPE) & real, int(Modality.VIDEO))

    # -- prefill checks --------------------------------------------------------------------

    def validate_inputs(self, model: nn.Module, inputs: Mapping[str, Any]) -> None:
        """``mm_token_type_ids`` present and consistent; pixels, grids and placeholder runs agree."""
        super().validate_inputs(model, inputs)
        input_ids = inputs.get("input_ids")
        media = [n for n in (*_MEDIA_INPUTS, "image_grid_thw", "video_grid_thw") if inputs.get(n) is not None]
        media += [f"mm_encoder_outputs[{k!r}]" for k in ("image", "video") if has_encoder_outputs(inputs, k)]
        if not isinstance(input_ids, torch.Tensor):
            if media:
                raise InvalidInputError(
                    f"{media[0]} given with inputs_embeds only: kvpress-mm needs input_ids (and mm_token_type_ids) "
                    "to find the image/video positions"
                )
            return
        types = inputs.get("mm_token_type_ids")
        if types is None and media:
            raise InvalidInputError(
                f"{type(model).__name__} got {', '.join(media)} without mm_token_type_ids. Without them "
                "transformers' generate computes Qwen's multimodal RoPE (M-RoPE) positions as if the prompt "
                f"were text only, silently. Pass mm_token_type_ids (0 text, 1 image, 2 video): {_HOW_TO_BUILD}"
            )
        if types is not None:
            self._check_token_types(model, input_ids, types)
        for code, pixels_name, grid_name in _MODALITIES:
            what = code.name.lower()
            pixels, grid = inputs.get(pixels_name), inputs.get(grid_name)
            encoded = _encoder_output_sizes(inputs, what)
            if pixels is None and encoded is None:
                check_no_orphan_placeholders(input_ids, self.token_ids(model)[code], what=what, inputs_name=pixels_name)
            elif grid is not None:
                self._check_grid(model, code, input_ids, grid, pixels)
            elif encoded is not None:
                # generate encodes the pixels before the prefill and passes the features instead of pixels and
                # grids (it checked the grids when it computed the positions: see `instrument`)
                self._check_runs(model, code, input_ids, encoded, "the precomputed features (mm_encoder_outputs)")
            else:
                raise InvalidInputError(
                    f"{pixels_name} given without {grid_name}: Qwen-VL needs each {what}'s (t, h, w) patch grid; "
                    "the image processor returns it with the pixels"
                )

    def _check_rope_inputs(self, model: nn.Module, inputs: Mapping[str, Any]) -> None:
        """What ``get_rope_index`` reads: token types against ids, grids against placeholder runs."""
        input_ids, types = inputs.get("input_ids"), inputs.get("mm_token_type_ids")
        if not isinstance(input_ids, torch.Tensor) or types is None:
            return
        self._check_token_types(model, input_ids, types)
        for code, pixels_name, grid_name in _MODALITIES:
            if inputs.get(grid_name) is not None:
                self._check_grid(model, code, input_ids, inputs[grid_name], inputs.get(pixels_name))

    def _check_grid(self, model: nn.Module, code: Modality, input_ids: torch.Tensor, grid: Any, pixels: Any) -> None:
        """The pixels fill the grid; one placeholder run of ``t*h*w / merge**2`` tokens per grid row."""
        config: Any = model.config
        merge = int(config.vision_config.spatial_merge_size)
        what = code.name.lower()
        grid_name = f"{what}_grid_thw"
        rows = _grid_rows(grid, grid_name)
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
        self._check_runs(model, code, input_ids, placeholder_runs(rows, merge, frames_separate), source)

    def _check_runs(
        self, model: nn.Module, code: Modality, input_ids: torch.Tensor, expected: list[int], source: str
    ) -> None:
        """The placeholder runs of ``input_ids``, row after row, are ``expected`` (in order)."""
        what = code.name.lower()
        token_id = self.token_ids(model)[code]
        found = _runs_per_row(input_ids == token_id)
        if [n for row in found for n in row] == expected:
            return
        frames_separate = code == Modality.VIDEO and video_frames_separate(model.config)
        if frames_separate and "grid" not in source and sum(map(sum, found)) == sum(expected):
            return  # per-video feature counts cannot tell where the frames split
        unit = f"{what} frame" if frames_separate else what
        raise InvalidInputError(
            f"{source} call(s) for {what} placeholder runs of {expected} tokens ({sum(expected)} in all, one "
            f"contiguous run per {unit}, in prompt order), but input_ids hold {sum(map(sum, found))} {what} "
            f"placeholder tokens (id {token_id}) in runs of {found} (per row). Each {unit}'s single placeholder "
            f"must be expanded into t*h*w/merge_size^2 tokens: {_HOW_TO_BUILD}"
        )

    def _check_token_types(self, model: nn.Module, input_ids: torch.Tensor, types: Any) -> None:
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
        ids = self.token_ids(model)
        for code, type_code in ((Modality.IMAGE, IMAGE_TYPE), (Modality.VIDEO, VIDEO_TYPE)):
            what = code.name.lower()
            wrong = ((types == type_code) != (input_ids == ids[code])).nonzero()
            if wrong.numel():
                where = [tuple(p) for p in wrong[:5].tolist()]
                raise InvalidInputError(
                    f"mm_token_type_ids disagree with input_ids at (row, position) {where}"
                    f"{' ...' if wrong.shape[0] > 5 else ''}: {type_code} must mark exactly the {what} placeholder "
                    f"tokens (id {ids[code]}); Qwen computes M-RoPE positions from mm_token_type_ids but places the "
                    f"{what} features by id. Use the mm_token_type_ids that came with these input_ids: {_HOW_TO_BUILD}"
                )

    def instrument(self, model: nn.Module) -> Callable[[], None] | None:
        """Check the inputs when transformers computes M-RoPE positions from them.

        ``generate`` computes positions (``get_rope_index``) before the model's forward, and
        fails there with a bare shape error on a mismatched prompt; the same checks as
        :meth:`validate_inputs` make (on what ``get_rope_index`` reads) run first, with clear
        messages.
        """
        rope_model = self._rope_model(model)
        if rope_model is None or "get_rope_index" in vars(rope_model):
            return None
        original = rope_model.get_rope_index
        parameters = list(inspect.signature(original).parameters)

        def get_rope_index(*args: Any, **kwargs: Any) -> Any:
            self._check_rope_inputs(model, {**dict(zip(parameters, args)), **kwargs})
            return original(*args, **kwargs)

        rope_model.get_rope_index = get_rope_index

        def undo() -> None:
            if vars(rope_model).get("get_rope_index") is get_rope_index:
                del rope_model.get_rope_index

        return undo

    # -- M-RoPE across calls ---------------------------------------------------------------

    @staticmethod
    def _rope_model(model: nn.Module) -> Any:
        """The submodule that owns ``get_rope_index`` and ``rope_deltas`` (``model.model``)."""
        inner = getattr(model, "model", None)
        return inner if hasattr(inner, "get_rope_index") else None

    def _prefill_positions(self, model: nn.Module, inputs: Mapping[str, Any], seq_len: int) -> torch.Tensor:
        """``[3 or 1, B, L]`` M-RoPE positions the prefill call gives its tokens (as the model derives them)."""
        position_ids = inputs.get("position_ids")
        if isinstance(position_ids, torch.Tensor):
            return _mrope_rows(position_ids)
        input_ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        types = inputs.get("mm_token_type_ids")
        has_grids = inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None
        rope_model = self._rope_model(model)
        if isinstance(input_ids, torch.Tensor) and types is not None and has_grids and rope_model is not None:
            names = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")
            extra = {n: inputs[n] for n in names if inputs.get(n) is not None}
            positions, _ = type(rope_model).get_rope_index(rope_model, input_ids, mm_token_type_ids=types, **extra)
            return positions
        reference = input_ids if isinstance(input_ids, torch.Tensor) else inputs.get("inputs_embeds")
        device = reference.device if isinstance(reference, torch.Tensor) else None
        stale = getattr(rope_model, "rope_deltas", None)
        if input_ids is None and isinstance(stale, torch.Tensor):
            # transformers' fallback for an inputs_embeds prefill: text positions + the stored delta
            if isinstance(mask, torch.Tensor):
                text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            else:
                text = torch.arange(seq_len, device=device)[None]
            return (text + stale.to(text.device))[None]
        return torch.arange(seq_len, device=device)[None, None]

    def record_prompt(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The prompt's rope delta per row: ``max(M-RoPE position) + 1 - real tokens``."""
        reference = inputs.get("input_ids")
        if not isinstance(reference, torch.Tensor):
            reference = inputs.get("inputs_embeds")
        assert isinstance(reference, torch.Tensor)
        batch, seq_len = int(reference.shape[0]), int(reference.shape[1])
        positions = self._prefill_positions(model, inputs, seq_len).expand(-1, batch, -1)  # [r, B, L]
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            real = mask.to(positions.device).bool()
        else:
            real = torch.ones(batch, seq_len, dtype=torch.bool, device=positions.device)
        lowest = torch.iinfo(positions.dtype).min if not positions.is_floating_point() else float("-inf")
        top = positions.masked_fill(~real[None], lowest).amax(dim=(0, 2))  # [B]
        return {"mrope_delta": (top + 1 - real.sum(-1)).long()}

    def validate_continuation(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        record: Mapping[str, Any],
        next_positions: torch.Tensor,
        new_valid: torch.Tensor,
    ) -> None:
        """No new images; M-RoPE positions = text positions + the prompt's rope delta."""
        delta = record.get("mrope_delta")
        if not isinstance(delta, torch.Tensor):
            return
        brought = [n for n in _MEDIA_INPUTS if inputs.get(n) is not None]
        brought += [f"mm_encoder_outputs[{k!r}]" for k in ("image", "video") if has_encoder_outputs(inputs, k)]
        # (placeholder ids in input_ids are not checked: a generated token may be one; generate marks it as text)
        types = inputs.get("mm_token_type_ids")
        if isinstance(types, torch.Tensor) and types.shape[-1] == new_valid.shape[-1] and bool((types != 0).any()):
            brought.append("image/video entries in mm_token_type_ids")
        if brought:
            raise InvalidInputError(
                f"a call on a compressed cache brings {', '.join(brought)}: new images or videos cannot be added to "
                "a compressed Qwen-VL cache (their M-RoPE positions would be computed from the shorter cache). "
                "Continue with text only (pass mm_token_type_ids only for the new tokens, or none), or start a "
                "new prompt with all the images"
            )
        position_ids = inputs.get("position_ids")
        if not isinstance(position_ids, torch.Tensor):
            raise InvalidInputError(
                "a call on a compressed Qwen-VL cache needs explicit position_ids: the positions the model would "
                "derive itself come from the (shorter) cache length. Use generate (pass only the new tokens as "
                "input_ids with the attention_mask of the whole conversation), or pass position_ids [4, batch, q]: "
                "the text positions, then 3 rows of text positions + model.model.rope_deltas"
            )
        delta = delta.to(position_ids.device)
        if position_ids.dim() == 2 and bool((delta != 0).any()):
            raise InvalidInputError(
                "2-D position_ids are ambiguous for a Qwen-VL prompt with images (the model reads them as M-RoPE "
                f"positions, which are the text positions + the prompt's rope delta {delta.tolist()}). Pass "
                "position_ids [4, batch, q]: the text positions, then 3 rows of text positions + rope delta"
            )
        rows = _mrope_rows(position_ids)  # [r, B or 1, q]
        valid = new_valid.to(position_ids.device)
        text = next_positions.to(position_ids.device)[:, None] + valid.long().cumsum(-1) - 1  # [B, q]
        expected = text + delta[:, None]
        if rows.shape[-1] != expected.shape[-1]:
            raise InvalidInputError(
                f"position_ids cover {rows.shape[-1]} tokens but the call brings {expected.shape[-1]}; pass positions "
                "for the new tokens only"
            )
        if bool(((rows == expected[None]) | ~valid[None]).all()):
            return
        current = getattr(self._rope_model(model), "rope_deltas", None)
        current_text = current.flatten().tolist() if isinstance(current, torch.Tensor) else current
        raise InvalidInputError(
            f"this compressed Qwen-VL cache continues at M-RoPE position(s) {expected[:, 0].tolist()} (text position "
            f"+ its prompt's rope delta {delta.tolist()}), but the call's position_ids start at "
            f"{rows[:, :, 0].tolist()}. generate adds model.model.rope_deltas (now {current_text}) to the text "
            "positions, and it is stale when another prompt ran since this cache's prefill, or when "
            "mm_token_type_ids covering the whole conversation were passed. Restore it first "
            f"(model.model.rope_deltas = torch.tensor({delta.tolist()}).view(-1, 1)), pass only the new tokens as "
            "input_ids with the attention_mask of the whole conversation, and mm_token_type_ids only for the new "
            "tokens (or none)"
        )
