"""Attention over a ragged layer: each KV head on its own, with the model's own attention function.

A layer compressed by a ragged plan (``adakv``: the KV heads of a row keep different numbers of
entries) is stored head by head (:class:`~kvpress_mm.cache.ragged.RaggedLayer`). Its ``update``
appends the step's entries to every head and returns only those, so the session computes the
layer's attention itself: for each KV head ``h``, the model's original ``sdpa`` / ``eager``
function runs on the query heads of ``h``'s group (``[B, groups, q, D]``) against ``h``'s own
keys and values (``[B, 1, length_h, D]``), with a mask built from ``h``'s slot validity (filler
slots hidden) and the new tokens causally. The group outputs are concatenated in head order:
``[B, q, heads, D]``, what the model's attention function returns. Each call is the model's
exact computation on that head's entries, so the output equals the model's attention over a
per-head masked cache; it costs ``kv_heads`` calls per layer and step instead of one.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from kvpress_mm.cache.ragged import RaggedLayer
from kvpress_mm.errors import InvalidInputError, InvalidPlanError, UnsupportedCacheError, UnsupportedModelError
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.views import LayerView
from kvpress_mm.session.attention import ACTIVE, AttentionCall, AttentionRoute, attention_weights_requested
from kvpress_mm.session.calls import CallInfo
from kvpress_mm.session.state import LayerState


def ragged_layer(cache: Any, layer_idx: int) -> RaggedLayer | None:
    """``cache``'s layer ``layer_idx`` if it is a ragged layer, else ``None``."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return layer if isinstance(layer, RaggedLayer) else None


def claim_ragged_layer(cache: Any, module: nn.Module, session: AttentionRoute) -> None:
    """Let ``session`` extend ``cache``'s layer of attention ``module`` if it is ragged, while it routes ``module``.

    The layer keeps only weak references: it keeps neither the session nor the model alive.
    """
    layer = ragged_layer(cache, int(module.layer_idx))  # type: ignore[arg-type]
    if layer is None:
        return
    module_ref, session_ref = weakref.ref(module), weakref.ref(session)

    def reads() -> bool:
        module, session = module_ref(), session_ref()
        return module is not None and session is not None and ACTIVE.for_module(module) is session

    layer.claim(reads)


def check_head_valid(name: str, plan: CompressionPlan, view: LayerView) -> None:
    """Raise :class:`~kvpress_mm.errors.InvalidPlanError` unless a ragged plan's ``head_valid`` is well-formed.

    Shape ``[batch, kv_heads, n_slots]`` bool, each head's filler slots first, ``slot_valid``
    equal to ``head_valid.any(1)``, and the real entries of each row and head distinct.
    """
    head_valid = plan.head_valid
    if head_valid is None:
        return
    kept = plan.kept_indices
    if head_valid.dtype != torch.bool or tuple(head_valid.shape) != tuple(kept.shape):
        raise InvalidPlanError(
            f"{name}: head_valid must be a bool tensor of shape {tuple(kept.shape)} (as kept_indices), "
            f"got {head_valid.dtype} {tuple(head_valid.shape)}"
        )
    # filler slots first: once a head's slot is real, every later slot of the head is
    if bool((head_valid.long().cummax(-1).values.bool() & ~head_valid).any()):
        raise InvalidPlanError(f"{name}: a head's filler slots must come before its real slots (left-filled)")
    if not torch.equal(plan.slot_valid, head_valid.any(1)):
        raise InvalidPlanError(f"{name}: slot_valid must be head_valid.any(1) in a ragged plan")
    for b in range(view.batch_size):
        for h in range(view.kv_heads):
            real = kept[b, h][head_valid[b, h]]
            if real.unique().numel() != real.numel():
                raise InvalidPlanError(f"{name}: row {b}, KV head {h} keeps an entry twice")


def attend_ragged(
    call: CallInfo, layer_state: LayerState, attention: AttentionCall, layer: RaggedLayer, decodes: bool
) -> tuple[torch.Tensor, None]:
    """The step's attention over a ragged layer, KV head by KV head (see the module docstring).

    ``layer`` already holds the step's entries (its ``update`` ran); ``layer_state`` is advanced
    past them.

    Raises:
        UnsupportedCacheError: the strategy evicts while decoding (``h2o``'s ``decode_eviction``),
            which needs a rectangular layer.
        UnsupportedModelError: eager attention weights are requested (``output_attentions``).
        InvalidInputError: the layer holds another number of entries than the session expects.

    """
    query, module = attention.query, attention.module
    layer_idx = attention.layer_idx
    if decodes:
        raise UnsupportedCacheError(
            f"layer {layer_idx} holds ragged per-head storage (adakv) and the strategy evicts while decoding; "
            "decode-time eviction needs equally long heads: use decode_eviction=False (h2o, tova)"
        )
    # only eager returns attention weights (sdpa gives none, ragged or not); the check costs a lookup per call
    if attention.wrapped == "eager" and (
        attention_weights_requested(module) or attention.kwargs.get("output_attentions")
    ):
        raise UnsupportedModelError(
            "attention weights (output_attentions) are not available for ragged per-head layers (adakv): "
            "their KV heads have different lengths. Generate without output_attentions"
        )
    batch, heads, q_len, _ = query.shape
    cached = layer.get_seq_length() - q_len
    if cached != layer_state.length:
        raise InvalidInputError(
            f"layer {layer_idx}'s ragged cache holds {cached} entries in its longest head but kvpress-mm expected "
            f"{layer_state.length}: the cache was changed outside the compressor"
        )
    if not call.new_all_valid:
        layer.mark_invalid_tail(call.new_valid)
    groups = heads // layer.kv_heads
    new_visible: torch.Tensor | None = None  # [B, q, q]: the new tokens, causally, real ones only
    outputs = []
    for h in range(layer.kv_heads):
        entries = layer.head(h)
        mask = None
        if q_len > 1 or entries.valid is not None:
            device = entries.keys.device
            if new_visible is None:
                causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
                new_valid = call.new_valid.to(device)
                # a padding token also sees itself: a head may hold no real entry of its row, and a
                # query that sees nothing would give NaN (which its key and value carry to the next layer)
                itself = torch.eye(q_len, dtype=torch.bool, device=device)[None] & ~new_valid[:, :, None]
                new_visible = (causal[None] & new_valid[:, None, :]) | itself
            length = int(entries.keys.shape[1])
            if entries.valid is None:
                cached_valid = torch.ones(batch, length - q_len, dtype=torch.bool, device=device)
            else:
                cached_valid = entries.valid[:, : length - q_len]
            visible = torch.cat([cached_valid[:, None, :].expand(-1, q_len, -1), new_visible], dim=-1)
            mask = attention.mask_from_visible(visible)
        group = query[:, h * groups : (h + 1) * groups]
        output, _ = attention.original(
            module, group, entries.keys[:, None], entries.values[:, None], mask, **attention.kwargs
        )
        outputs.append(output)  # [B, q, groups, D]
    layer_state.length = layer.get_seq_length()
    return torch.cat(outputs, dim=2), None
