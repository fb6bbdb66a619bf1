"""The decode side of a session: attention on a compressed layer, with the mask the session owns.

A compressed layer's cache columns no longer line up with the 2-D ``attention_mask`` generate
keeps, so the session builds the layer's mask from the kept slots' validity (filler slots of
shorter rows are hidden) plus the new tokens, causally. Positions are untouched: generate
derives them from the full 2-D mask, so decoding continues at the original absolute positions.
Strategies that act while decoding (``h2o``) get a :class:`~kvpress_mm.DecodeView` after the
step's attention and may return a plan that evicts entries.
"""

from __future__ import annotations

from typing import Any

import torch

from kvpress_mm.errors import InvalidInputError, InvalidPlanError
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.views import DecodeView
from kvpress_mm.session.attention import AttentionCall
from kvpress_mm.session.calls import CallInfo
from kvpress_mm.session.slots import slot_modality
from kvpress_mm.session.state import LayerState


def visible_keys(layer_state: LayerState, call: CallInfo, q_len: int, device: torch.device) -> torch.Tensor:
    """``[B, q, cached + q]`` bool: the layer's valid slots, then the new tokens causally."""
    cached_valid = layer_state.cached_valid(call.batch_size, device)
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
    new_valid = call.new_valid.to(device)
    return torch.cat([cached_valid[:, None, :].expand(-1, q_len, -1), causal[None] & new_valid[:, None, :]], dim=-1)


def attend_compressed(
    strategy: Any, call: CallInfo, layer_state: LayerState, attention: AttentionCall, decodes: bool
) -> tuple[tuple[torch.Tensor, Any], CompressionPlan | None]:
    """The step's attention over a compressed layer, and the strategy's decode plan (``decodes`` only).

    ``layer_state`` is advanced past the step's new entries.

    Raises:
        InvalidInputError: the layer holds another number of entries than the session expects
            (the cache was edited outside the compressor).

    """
    query, key, layer_idx = attention.query, attention.key, attention.layer_idx
    q_len = query.shape[2]
    cached = key.shape[2] - q_len
    if cached != layer_state.length:
        raise InvalidInputError(
            f"layer {layer_idx}'s compressed cache holds {cached} entries but kvpress-mm expected "
            f"{layer_state.length}: the cache was changed outside the compressor (crop, reorder, beam search?)"
        )
    visible: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    if not (q_len == 1 and layer_state.slot_valid is None and call.new_all_valid):
        visible = visible_keys(layer_state, call, q_len, key.device)
        mask = attention.mask_from_visible(visible)
    output = attention.run_original(mask)
    if layer_state.slot_valid is None and call.new_all_valid:
        slot_valid = None
    else:
        slot_valid = torch.cat(
            [layer_state.cached_valid(call.batch_size, key.device), call.new_valid.to(key.device)], dim=-1
        )
    plan = None
    if decodes:
        if visible is None:
            visible = visible_keys(layer_state, call, q_len, key.device)
        known, kv_heads, length = layer_state.slot_modality, int(key.shape[1]), cached + q_len
        view = DecodeView(
            layer_idx=layer_idx,
            keys=key,
            values=attention.value,
            queries=query,
            scaling=attention.scaling,
            slot_valid=slot_valid if slot_valid is not None else visible[:, -1],
            visible=visible,
            n_keep=layer_state.n_keep,
            state=layer_state.strategy_state,
            head_modality=lambda: slot_modality(known, slot_valid, call.batch_size, kv_heads, length),
        )
        plan = strategy.decode_plan(view)
        if plan is not None:
            check_decode_plan(type(strategy).__name__, plan, view)
    layer_state.length = cached + q_len
    layer_state.slot_valid = slot_valid
    return output, plan


def check_decode_plan(name: str, plan: CompressionPlan, view: DecodeView) -> None:
    """Raise :class:`~kvpress_mm.errors.InvalidPlanError` unless a decode-time ``plan`` fits ``view`` (of ``name``)."""
    if not isinstance(plan, CompressionPlan):
        raise InvalidPlanError(f"{name}.decode_plan() must return a CompressionPlan or None, got {type(plan).__name__}")
    b, h, kv = view.batch_size, view.kv_heads, int(view.keys.shape[2])
    kept, valid = plan.kept_indices, plan.slot_valid
    if kept.dim() != 3 or tuple(kept.shape[:2]) != (b, h) or tuple(valid.shape) != (b, kept.shape[2]):
        raise InvalidPlanError(
            f"{name}: decode plan shapes kept_indices {tuple(kept.shape)} / slot_valid {tuple(valid.shape)} "
            f"do not match [batch={b}, kv_heads={h}, n_slots]"
        )
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= kv):
        raise InvalidPlanError(f"{name}: decode plan kept_indices out of range [0, {kv})")
    kept_valid = view.slot_valid.to(kept.device).gather(1, kept.flatten(1)).view_as(kept)
    if bool((~kept_valid & valid[:, None, :].to(kept.device)).any()):
        raise InvalidPlanError(f"{name}: the decode plan keeps filler slots as valid entries")
    for tensor, what in ((plan.keys, "keys"), (plan.values, "values")):
        if tensor is not None and tuple(tensor.shape) != (*kept.shape, view.keys.shape[-1]):
            raise InvalidPlanError(f"{name}: merged {what} must have shape {(*kept.shape, view.keys.shape[-1])}")
