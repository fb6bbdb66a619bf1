"""Applying plans to transformers cache layers so that evicted entries' memory is released.

Also which cache layers can be compressed at all: transformers' ``DynamicLayer``, our
:class:`~kvpress_mm.cache.growing.GrowingLayer`, whose shape is their whole state, and
transformers' quantized layers (``QuantizedCache``: quanto, HQQ, fp8), whose kept entries are
stored quantized (:mod:`kvpress_mm.cache.quantized`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from kvpress_mm.cache import quantized
from kvpress_mm.cache.growing import GrowingLayer
from kvpress_mm.cache.ragged import RaggedLayer, apply_ragged_plan, can_hold_ragged_heads, ragged_storage_refusal
from kvpress_mm.errors import UnsupportedCacheError
from kvpress_mm.ops.plan import CompressionPlan, gather_entries


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if it owns exactly its storage, else a compact copy (never a view)."""
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def kept_entries(plan: CompressionPlan, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's slots ``[B, kvH, n_slots, D]`` from ``keys`` / ``values``: kept (or merged), fillers zeroed.

    In the dtype of ``keys`` / ``values``; may be views of them.
    """
    index = plan.kept_indices.to(keys.device)
    new_keys = plan.keys if plan.keys is not None else gather_entries(keys, index)
    new_values = plan.values if plan.values is not None else gather_entries(values, index)
    slot_valid = plan.slot_valid.to(keys.device)
    if not bool(slot_valid.all()):
        filler = ~slot_valid[:, None, :, None]
        new_keys = new_keys.masked_fill(filler, 0)
        new_values = new_values.masked_fill(filler, 0)
    return new_keys.to(keys.dtype), new_values.to(values.dtype)


def apply_plan(
    layer: object, plan: CompressionPlan, keys: torch.Tensor | None = None, values: torch.Tensor | None = None
) -> None:
    """Make the plan's slots the layer's whole content; filler slots are zeroed.

    ``keys`` / ``values`` ``[B, kvH, seq, D]`` are the entries the plan indexes: what the layer's
    attention call received (the default, ``layer.keys`` / ``layer.values``, is the same thing for
    a ``DynamicLayer``). A quantized layer holds them only quantized, so they must be given: the
    kept entries are then quantized from them (:func:`~kvpress_mm.cache.quantized.store`).
    Otherwise the new tensors own storage of exactly ``n_slots`` entries. A ragged plan
    (``plan.head_valid`` set) makes the layer a :class:`~kvpress_mm.cache.ragged.RaggedLayer`
    instead, each KV head stored on its own (not on quantized layers: a clear error).
    """
    if plan.head_valid is not None:
        apply_ragged_plan(layer, plan)
        return
    if quantized.is_quantized(layer):
        if keys is None or values is None:
            raise ValueError("apply_plan on a quantized cache layer needs the keys and values the plan indexes")
        quantized.store(layer, *kept_entries(plan, keys, values))
        return
    keys = layer.keys if keys is None else keys  # type: ignore[attr-defined]
    values = layer.values if values is None else values  # type: ignore[attr-defined]
    assert keys is not None and values is not None
    new_keys, new_values = kept_entries(plan, keys, values)
    layer.keys = _own_storage(new_keys)  # type: ignore[attr-defined]
    layer.values = _own_storage(new_values)  # type: ignore[attr-defined]


def kv_bytes(layer: object) -> int:
    """Bytes held by a cache layer's keys and values.

    A quantized layer: its store and residual window; a ragged layer: the sum of its heads' entries.
    """
    if quantized.is_quantized(layer):
        return quantized.stored_bytes(layer)
    if isinstance(layer, RaggedLayer):
        return layer.stored_bytes()
    keys = getattr(layer, "keys", None)
    values = getattr(layer, "values", None)
    total = 0
    for tensor in (keys, values):
        if isinstance(tensor, torch.Tensor):
            total += tensor.numel() * tensor.element_size()
    return total


def compressible(layer: Any) -> bool:
    """A plain ``DynamicLayer``, kvpress-mm's ``GrowingLayer``, or a supported quantized layer."""
    return type(layer) is DynamicLayer or type(layer) is GrowingLayer or quantized.quantized_kind(layer) is not None


#: How the errors name the caches kvpress-mm compresses, and how to get one.
SUPPORTED_CACHES = (
    "compression needs transformers' DynamicCache (the default: leave cache_implementation unset, or pass "
    "cache=DynamicCache(config=model.config)); for a low-memory cache, use a quantized one: "
    "cache_implementation='quantized' (quanto or HQQ backend: pip install 'kvpress-mm[quant]'; or "
    "cache_config={'backend': 'fp8'}), which compression composes with"
)


def unsupported_cache_layer(layer: Any, layer_idx: int) -> UnsupportedCacheError:
    """The error for a cache layer that cannot be compressed, naming what to do instead."""
    reason = quantized.unsupported_reason(layer)
    if reason is not None:
        return UnsupportedCacheError(f"cannot compress the quantized cache layer {layer_idx}: {reason}")
    return UnsupportedCacheError(
        f"cannot compress a {type(layer).__name__} cache layer (layer {layer_idx}; StaticCache: "
        f"cache_implementation='static' or 'offloaded_static'): {SUPPORTED_CACHES}"
    )


def check_cache_layers(
    cache: Any,
    *,
    evicts_while_decoding: bool = False,
    ragged_heads: bool = False,
    strategy: str = "the strategy",
    remedy: str = "Turn its decode-time eviction off",
) -> None:
    """Refuse, up front, a cache kvpress-mm cannot compress (or not with ``strategy``).

    Refused: an offloaded cache (``cache_implementation='offloaded'``: its layers move between
    devices behind the session's back), a cache whose (non-sliding) layers are neither
    ``DynamicLayer``, ``GrowingLayer`` nor supported quantized layers, a quanto / HQQ cache
    when ``strategy`` evicts while decoding
    (:func:`~kvpress_mm.cache.quantized.check_decode_eviction`), and, when the strategy's plans
    give KV heads different budgets (``ragged_heads``: adakv), a cache whose layers cannot hold
    heads of different lengths (quantized ones).
    """
    if getattr(cache, "offloading", False):
        raise UnsupportedCacheError(
            "cannot compress an offloaded cache (cache_implementation='offloaded', or a cache built with "
            f"offloading=True): its layers are moved between devices behind the compressor's back; {SUPPORTED_CACHES}"
        )
    for layer_idx, layer in enumerate(getattr(cache, "layers", None) or ()):
        if not getattr(layer, "is_sliding", False) and not compressible(layer):
            raise unsupported_cache_layer(layer, layer_idx)
    if evicts_while_decoding:
        quantized.check_decode_eviction(cache, strategy, remedy)
    if ragged_heads:  # refused before the prefill, not when the first plan happens to be ragged
        for layer in getattr(cache, "layers", None) or ():
            if not getattr(layer, "is_sliding", False) and not can_hold_ragged_heads(layer):
                raise ragged_storage_refusal(layer)


def check_decode_eviction(cache: Any, strategy: str, remedy: str) -> None:
    """Refuse, before a call continues ``cache``, a strategy that evicts while decoding where it cannot.

    Quanto / HQQ layers (each eviction would re-quantize the whole cache:
    :func:`~kvpress_mm.cache.quantized.check_decode_eviction`) and ragged layers (decode-time
    eviction keeps every head at one budget; ragged heads hold different numbers of entries).
    """
    quantized.check_decode_eviction(cache, strategy, remedy)
    for layer_idx, layer in enumerate(getattr(cache, "layers", None) or ()):
        if isinstance(layer, RaggedLayer):
            raise UnsupportedCacheError(
                f"{strategy} evicts cache entries while decoding, but layer {layer_idx} of this cache stores ragged "
                f"per-head layers (adakv), and decode-time eviction needs equally long heads. {remedy}"
            )
