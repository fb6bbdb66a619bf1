"""Applying plans to transformers cache layers so that evicted entries' memory is released.

Also which cache layers can be compressed at all: transformers' ``DynamicLayer`` and our
:class:`~kvpress_mm.cache.growing.GrowingLayer`, whose shape is their whole state.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from kvpress_mm.cache.growing import GrowingLayer
from kvpress_mm.cache.ragged import RaggedLayer, apply_ragged_plan
from kvpress_mm.errors import UnsupportedCacheError
from kvpress_mm.ops.plan import CompressionPlan, gather_entries


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if it owns exactly its storage, else a compact copy (never a view)."""
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def apply_plan(layer: object, plan: CompressionPlan) -> None:
    """Replace ``layer.keys`` / ``layer.values`` (``[B, kvH, seq, D]``) by the plan's kept slots.

    The new tensors own storage of exactly ``n_slots`` entries; filler slots are zeroed. A
    ragged plan (``plan.head_valid`` set) makes the layer a
    :class:`~kvpress_mm.cache.ragged.RaggedLayer` instead, each KV head stored on its own.
    """
    if plan.head_valid is not None:
        apply_ragged_plan(layer, plan)
        return
    keys: torch.Tensor = layer.keys  # type: ignore[attr-defined]
    values: torch.Tensor = layer.values  # type: ignore[attr-defined]
    index = plan.kept_indices.to(keys.device)
    new_keys = plan.keys if plan.keys is not None else gather_entries(keys, index)
    new_values = plan.values if plan.values is not None else gather_entries(values, index)
    slot_valid = plan.slot_valid.to(keys.device)
    if not bool(slot_valid.all()):
        filler = ~slot_valid[:, None, :, None]
        new_keys = new_keys.masked_fill(filler, 0)
        new_values = new_values.masked_fill(filler, 0)
    layer.keys = _own_storage(new_keys.to(keys.dtype))  # type: ignore[attr-defined]
    layer.values = _own_storage(new_values.to(values.dtype))  # type: ignore[attr-defined]


def kv_bytes(layer: object) -> int:
    """Bytes held by a cache layer's keys and values (a ragged layer: the sum of its heads' entries)."""
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
    """A plain ``DynamicLayer``, or kvpress-mm's :class:`~kvpress_mm.cache.growing.GrowingLayer`."""
    return type(layer) is DynamicLayer or type(layer) is GrowingLayer


def unsupported_cache_layer(layer: Any, layer_idx: int) -> UnsupportedCacheError:
    """The error for a cache layer that cannot be compressed, naming what to do instead."""
    return UnsupportedCacheError(
        f"cannot compress a {type(layer).__name__} cache layer (layer {layer_idx}); compression needs "
        "transformers' DynamicCache: do not set cache_implementation='static' (or quantized/offloaded), "
        "or pass past_key_values=DynamicCache(config=model.config)"
    )


def check_cache_layers(cache: Any) -> None:
    """Refuse, up front, a cache whose (non-sliding) layers are not plain ``DynamicLayer``s (or growing ones)."""
    for layer_idx, layer in enumerate(getattr(cache, "layers", None) or ()):
        if not getattr(layer, "is_sliding", False) and not compressible(layer):
            raise unsupported_cache_layer(layer, layer_idx)
