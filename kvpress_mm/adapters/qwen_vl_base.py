"""What the Qwen2-VL, Qwen2.5-VL and Qwen3-VL adapters share: the modality map, input checks, M-RoPE.

The prompt layout (placeholder runs per grid row, ``mm_token_type_ids``) and the checks of it live
in :mod:`kvpress_mm.adapters.qwen_vl_prompts`.

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
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kvpress_mm.adapters.base import padding_aware_text_map
from kvpress_mm.adapters.placeholders import check_no_orphan_placeholders, has_encoder_outputs
from kvpress_mm.adapters.qwen_vl_prompts import (
    HOW_TO_BUILD,
    IMAGE_TYPE,
    VIDEO_TYPE,
    check_grid,
    check_runs,
    check_token_types,
)
from kvpress_mm.adapters.vlm import VisionLanguageAdapter
from kvpress_mm.errors import InvalidInputError
from kvpress_mm.modality import Modality

#: Inputs that bring images / videos into a Qwen-VL call (``image_grid_thw`` alone does not:
#: ``generate`` passes it again at every decoding step).
_MEDIA_INPUTS = ("pixel_values", "pixel_values_videos")
_MODALITIES = (
    (Modality.IMAGE, "pixel_values", "image_grid_thw"),
    (Modality.VIDEO, "pixel_values_videos", "video_grid_thw"),
)


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
                f"were text only, silently. Pass mm_token_type_ids (0 text, 1 image, 2 video): {HOW_TO_BUILD}"
            )
        if types is not None:
            check_token_types(self.token_ids(model), input_ids, types)
        for code, pixels_name, grid_name in _MODALITIES:
            what = code.name.lower()
            pixels, grid = inputs.get(pixels_name), inputs.get(grid_name)
            encoded = _encoder_output_sizes(inputs, what)
            if pixels is None and encoded is None:
                check_no_orphan_placeholders(input_ids, self.token_ids(model)[code], what=what, inputs_name=pixels_name)
            elif grid is not None:
                check_grid(model.config, self.token_ids(model)[code], code, input_ids, grid, pixels)
            elif encoded is not None:
                # generate encodes the pixels before the prefill and passes the features instead of pixels and
                # grids (it checked the grids when it computed the positions: see `instrument`)
                check_runs(
                    model.config,
                    self.token_ids(model)[code],
                    code,
                    input_ids,
                    encoded,
                    "the precomputed features (mm_encoder_outputs)",
                )
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
        check_token_types(self.token_ids(model), input_ids, types)
        for code, pixels_name, grid_name in _MODALITIES:
            if inputs.get(grid_name) is not None:
                check_grid(
                    model.config,
                    self.token_ids(model)[code],
                    code,
                    input_ids,
                    inputs[grid_name],
                    inputs.get(pixels_name),
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
        position_ids = inputs.get("position_ids")
        # mm_token_type_ids only matter when the model derives positions from them: with explicit position_ids
        # (checked below against the prompt's delta) it never reads them, and assisted decoding passes stale
        # slices of them (the types of earlier tokens, an image's when the prompt ends with one)
        if (
            not isinstance(position_ids, torch.Tensor)
            and isinstance(types, torch.Tensor)
            and types.shape[-1] == new_valid.shape[-1]
            and bool((types != 0).any())
        ):
            brought.append("image/video entries in mm_token_type_ids")
        if brought:
            raise InvalidInputError(
                f"a call on a compressed cache brings {', '.join(brought)}: new images or videos cannot be added to "
                "a compressed Qwen-VL cache (their M-RoPE positions would be computed from the shorter cache). "
                "Continue with text only (pass mm_token_type_ids only for the new tokens, or none), or start a "
                "new prompt with all the images"
            )
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
