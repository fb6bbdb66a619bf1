"""Applying plans to transformers cache layers so that evicted entries' memory is released."""

from __future__ import annotations

import torch

from kvpress_mm.plan import CompressionPlan


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if it owns exactly its storage, else a compact copy (never a view)."""
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def gather_entries(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor [B, H, P, D]`` at ``index [B, H, n]`` (positions along ``P``) -> ``[B, H, n, D]``.

    The same as ``tensor.gather(2, index[..., None].expand(-1, -1, -1, D))``, but a contiguous
    ``tensor`` is read whole rows at a time (``index_select`` on its flattened entries), several
    times faster on CPU: it runs at every decode step of ``h2o``.
    """
    b, h, p, d = tensor.shape
    if not tensor.is_contiguous():
        return tensor.gather(2, index[..., None].expand(-1, -1, -1, d))
    offsets = torch.arange(0, b * h * p, p, device=index.device).view(b, h, 1)
    rows = tensor.view(b * h * p, d).index_select(0, (index + offsets).flatten())
    return rows.view(b, h, index.shape[-1], d)


def apply_plan(layer: object, plan: CompressionPlan) -> None:
    """Replace ``layer.keys`` / ``layer.values`` (``[B, kvH, seq, D]``) by the plan's kept slots.

    The new tensors own storage of exactly ``n_slots`` entries; filler slots are zeroed.
    """
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
    """Bytes held by a cache layer's keys and values."""
    keys = getattr(layer, "keys", None)
    values = getattr(layer, "values", None)
    total = 0
    for tensor in (keys, values):
        if isinstance(tensor, torch.Tensor):
            total += tensor.numel() * tensor.element_size()
    return total
