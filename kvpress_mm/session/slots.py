"""The modality of every slot of a compressed layer, per KV head, through plans, appends and row changes.

A strategy that re-plans a compressed cache (``decoding``, ``chunked-prefill``) needs to know
what each cached entry came from: prompt entries keep their own modality, decoded entries are
``TEXT``, filler slots ``PADDING``. Selections are per KV head, so after a plan the same slot
may hold a text entry in one head and an image entry in another: the modality is kept per
``[batch, kv_heads, slot]``.

To cost nothing per decode step, a layer keeps only the modality of its first slots
(:attr:`~kvpress_mm.session.state.LayerState.slot_modality`, set whenever a plan is applied);
every slot after those was appended since (a decoded or continued token): ``TEXT`` where the
slot is valid, ``PADDING`` where it is not. :func:`slot_modality` builds the whole map when a
strategy asks for it; a plan turns it into the new known prefix (:func:`modality_after_plan`).
"""

from __future__ import annotations

import torch

from kvpress_mm.modality import Modality
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.session.state import LayerState


def slot_modality(
    known: torch.Tensor | None, slot_valid: torch.Tensor | None, batch: int, kv_heads: int, length: int
) -> torch.Tensor:
    """``[batch, kv_heads, length]`` int8: each slot's modality per KV head.

    Args:
        known: ``[batch, kv_heads, n]`` the modality of the first ``n`` slots (``None``: no slot
            known, every slot was appended); a longer ``known`` is cut to ``length``.
        slot_valid: ``[batch, length]`` bool, False for filler slots (``None``: all valid).
        batch: rows.
        kv_heads: KV heads.
        length: slots the layer holds.

    """
    device = known.device if known is not None else (slot_valid.device if slot_valid is not None else None)
    appended = torch.full((batch, length), int(Modality.TEXT), dtype=torch.int8, device=device)
    if slot_valid is not None:
        appended = appended.masked_fill(~slot_valid.to(appended.device), int(Modality.PADDING))
    full = appended[:, None, :].expand(-1, kv_heads, -1)
    if known is None or known.shape[-1] == 0:
        return full.contiguous()
    n = min(int(known.shape[-1]), length)
    return torch.cat([known[..., :n].to(appended.device), full[..., n:]], dim=-1)


def modality_after_plan(before: torch.Tensor, plan: CompressionPlan) -> torch.Tensor:
    """``[batch, kv_heads, n_slots]``: the modality of the slots a plan keeps, ``PADDING`` at its filler slots.

    Args:
        before: ``[batch, kv_heads, seq]`` (or ``[batch, seq]``, the same for every head) the
            modality of the slots the plan chose from.
        plan: the plan applied.

    """
    kept = plan.kept_indices.to(before.device)
    if before.dim() == 2:
        before = before[:, None, :].expand(-1, kept.shape[1], -1)
    after = before.gather(2, kept)
    filler = ~plan.slot_valid.to(before.device)[:, None, :]
    return after.masked_fill(filler, int(Modality.PADDING))


def follow_plan(layer_state: LayerState, plan: CompressionPlan, prompt: torch.Tensor | None = None) -> None:
    """Record in ``layer_state`` the modality of the slots ``plan`` keeps (before ``set_slots``).

    Args:
        layer_state: the layer's state, still describing the slots the plan chose from.
        plan: the plan just applied.
        prompt: ``[batch, seq]`` the prompt's modality map, when the plan chose from a prompt
            (a prefill); otherwise the layer's own slots.

    """
    if prompt is not None:
        before = prompt
    else:
        batch, kv_heads = int(plan.kept_indices.shape[0]), int(plan.kept_indices.shape[1])
        before = slot_modality(layer_state.slot_modality, layer_state.slot_valid, batch, kv_heads, layer_state.length)
    layer_state.slot_modality = modality_after_plan(before, plan)
