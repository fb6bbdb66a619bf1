"""The prefill side of a session: a layer's plan right after its prompt attention.

For strategies that declare ``needs_accumulated_attention`` (``h2o``, LOOK-M) the session
computes the prefill attention itself where that is exactly the model's function
(:func:`fused_prefill_attention`): :func:`~kvpress_mm.ops.scoring.attention_with_column_sums`
yields the output and the all-query column sums from one softmax, and the sums seed the layer's
view (no second pass). Otherwise the model's attention runs and statistics are computed lazily.
"""

from __future__ import annotations

from typing import Any

import torch

from kvpress_mm.cache.surgery import compressible, unsupported_cache_layer
from kvpress_mm.errors import InvalidInputError, InvalidPlanError
from kvpress_mm.modality import Modality
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.scoring import attention_with_column_sums
from kvpress_mm.ops.views import LayerView
from kvpress_mm.session.attention import AttentionCall, MaskChecks, fusable
from kvpress_mm.session.calls import CallInfo
from kvpress_mm.session.state import CacheState, LayerState, attach_state, state_of


def fused_prefill_attention(
    strategy: Any, call: CallInfo, cache: Any, attention: AttentionCall, masks: MaskChecks
) -> tuple[tuple[torch.Tensor, Any], torch.Tensor] | None:
    """The layer's prefill attention and its column sums in one pass, or ``None`` to use the original.

    Taken when ``strategy`` declares ``needs_accumulated_attention`` and our chunked attention
    computes exactly what the original would (see :func:`~kvpress_mm.session.attention.fusable`);
    the sums then seed the layer's :class:`~kvpress_mm.LayerView`, so they are not computed a
    second time.
    """
    if not getattr(strategy, "needs_accumulated_attention", False):  # a wrapper reports its inner's
        return None
    modality = call.modality
    layers = getattr(cache, "layers", None)
    if modality is None or layers is None or attention.layer_idx >= len(layers):
        return None
    layer = layers[attention.layer_idx]
    if getattr(layer, "is_sliding", False) or not compressible(layer):
        return None  # plan_layer skips the layer or refuses the cache
    if not fusable(attention, modality):
        return None
    key_valid = (modality != Modality.PADDING).to(attention.key.device)
    if not masks.plain_causal(attention, key_valid):
        return None
    query, key, value = attention.query, attention.key, attention.value
    output, sums = attention_with_column_sums(query, key, value, attention.scaling, key_valid, key_valid)
    # what transformers' sdpa_attention_forward / eager_attention_forward return (no weights asked for)
    return (output.transpose(1, 2).contiguous(), None), sums


def prefill_view(
    call: CallInfo, cache: Any, attention: AttentionCall, num_layers: int, accumulated: torch.Tensor | None = None
) -> LayerView:
    """The :class:`~kvpress_mm.LayerView` of a layer right after its prefill attention.

    The cache gets its :class:`~kvpress_mm.session.state.CacheState` with its first layer.

    Raises:
        UnsupportedCacheError: the cache layer cannot be compressed.
        InvalidInputError: the layer saw another number of keys than the call has positions.

    """
    assert call.modality is not None
    layer_idx, key = attention.layer_idx, attention.key
    layer = cache.layers[layer_idx]
    if not compressible(layer):
        raise unsupported_cache_layer(layer, layer_idx)
    if key.shape[2] != call.modality.shape[1]:
        raise InvalidInputError(
            f"layer {layer_idx} saw {key.shape[2]} prompt keys but the call has {call.modality.shape[1]} "
            "positions; chunked prefill is not supported under compression"
        )
    if state_of(cache) is None:
        next_positions = (call.modality != Modality.PADDING).sum(-1)
        attach_state(cache, CacheState(call.q_len, next_positions=next_positions, prompt_record=call.prompt_record))
    return LayerView(
        layer_idx=layer_idx,
        keys=key,
        values=attention.value,
        queries=attention.query,
        scaling=attention.scaling,
        modality=call.modality.to(key.device),  # layers may live on different devices
        n_keep=call.n_keep,
        accumulated_attention_per_head=accumulated,
        num_layers=num_layers,
        call_state=call.strategy_state,
    )


def plan_layer(strategy: Any, call: CallInfo, view: LayerView) -> tuple[CompressionPlan, LayerState]:
    """Ask ``strategy`` for the plan of ``view``'s layer, check it, and describe the layer it leaves.

    Raises:
        InvalidPlanError: the strategy broke the plan contract.

    """
    plan = strategy.plan(view)
    check_plan(type(strategy).__name__, plan, view)
    return plan, LayerState(plan.n_slots, None, call.n_keep, view.state)


def plan_deferred_layers(
    strategy: Any, call: CallInfo, views: list[LayerView]
) -> list[tuple[CompressionPlan, LayerState]]:
    """The plans of every observed layer of a prefill, from a strategy that defers its plans, all checked.

    Raises:
        InvalidPlanError: the strategy returned another number of plans, or broke the plan contract.

    """
    name = type(strategy).__name__
    plans = list(strategy.plan_deferred(views))
    if len(plans) != len(views):
        raise InvalidPlanError(f"{name}.plan_deferred() returned {len(plans)} plans for {len(views)} layers")
    for plan, view in zip(plans, views, strict=True):
        check_plan(name, plan, view)
    return [
        (plan, LayerState(plan.n_slots, None, call.n_keep, view.state)) for plan, view in zip(plans, views, strict=True)
    ]


def check_plan(name: str, plan: CompressionPlan, view: LayerView) -> None:
    """Raise :class:`~kvpress_mm.errors.InvalidPlanError` unless ``plan`` fits ``view`` (strategy ``name``)."""
    if not isinstance(plan, CompressionPlan):
        raise InvalidPlanError(f"{name}.plan() must return a CompressionPlan, got {type(plan).__name__}")
    b, h = view.batch_size, view.kv_heads
    kept, valid = plan.kept_indices, plan.slot_valid
    if kept.dim() != 3 or tuple(kept.shape[:2]) != (b, h) or tuple(valid.shape) != (b, kept.shape[2]):
        raise InvalidPlanError(
            f"{name}: plan shapes kept_indices {tuple(kept.shape)} / slot_valid {tuple(valid.shape)} "
            f"do not match [batch={b}, kv_heads={h}, n_slots]"
        )
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= view.seq_len):
        raise InvalidPlanError(f"{name}: kept_indices out of range [0, {view.seq_len})")
    kept_modality = view.modality.gather(1, kept.flatten(1)).view_as(kept)
    if bool((kept_modality == Modality.PADDING)[valid[:, None, :].expand_as(kept)].any()):
        raise InvalidPlanError(f"{name}: the plan keeps padding entries")
    for tensor, what in ((plan.keys, "keys"), (plan.values, "values")):
        if tensor is not None and tuple(tensor.shape) != (*kept.shape, view.keys.shape[-1]):
            raise InvalidPlanError(f"{name}: merged {what} must have shape {(*kept.shape, view.keys.shape[-1])}")
