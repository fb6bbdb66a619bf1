"""A naive chunked prefill that runs the chunks itself: the reference of the session's chunked prefill.

The reference never uses a cache. For chunk ``c`` (positions ``start .. end - 1``) it runs a full
no-cache forward over the whole prompt (VLMs need whole images) in which, per layer and KV head,

- the rows of every chunk ``c' <= c`` see exactly what they saw when their chunk ran: the columns
  the layer had kept after chunk ``c' - 1`` plus their own chunk, causally (padding hidden);
- later rows see only themselves (they influence nothing before them);

captures each layer's post-RoPE queries and keys, and plans each layer on a
:class:`~kvpress_mm.ops.cache_view.CacheView` it assembles itself from them: the kept columns
(filler first) then the chunk's, the chunk's queries, the prompt's modality gathered per KV head,
the chunk's budget (``int(seen * (1 - r))`` of the real tokens seen, at least 1), and, for
strategies that read accumulated attention, the attention each column received from the queries
of the earlier chunks, summed here with a plain softmax. The plan's kept slots become the layer's
kept columns. Nothing of the session is used: only the strategy's own ``plan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvpress_mm.modality import Modality
from kvpress_mm.ops.cache_view import CacheView
from tests.helpers.masked_reference import masked_logits


@dataclass
class ChunkedReference:
    """What the reference chunked prefill ends with."""

    kept: dict[int, torch.Tensor]  # per layer [B, kvH, n] kept columns, -1 at filler slots
    visibility: dict[int, torch.Tensor]  # per layer [B, kvH, L, L]: what each prompt row saw
    logits: torch.Tensor  # [B, L, V] of the prompt's positions
    peak_entries: dict[int, int]  # per layer: the most slots the layer held (kept + one chunk)


def budget(real: int, ratio: float) -> int:
    """``int(real * (1 - ratio))``, at least 1 (0 for no real token)."""
    return 0 if real <= 0 else max(1, int(real * (1 - ratio)))


def modality_from_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_id: int, video_id: int = -1
) -> torch.Tensor:
    """``[B, L]`` int8: image / video placeholders, text, padding where the mask is 0."""
    modality = torch.full(input_ids.shape, int(Modality.TEXT), dtype=torch.int8)
    modality[input_ids == image_id] = int(Modality.IMAGE)
    modality[input_ids == video_id] = int(Modality.VIDEO)
    return modality.masked_fill(attention_mask == 0, int(Modality.PADDING))


def _gather_columns(tensor: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``tensor [B, H, L, ...]`` at ``columns [B, H, n]`` (-1 -> column 0, masked by the caller)."""
    index = columns.clamp(min=0)
    if tensor.dim() == 4:
        return tensor.gather(2, index[..., None].expand(-1, -1, -1, tensor.shape[-1]))
    return tensor.gather(2, index)


@torch.no_grad()
def chunked_prefill_reference(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    modality: torch.Tensor,
    strategy: Any,
    chunk_size: int,
    ratio: float,
    extra_inputs: dict[str, Any] | None = None,
    explicit_positions: bool = True,
    sliding: dict[int, int] | None = None,
) -> ChunkedReference:
    """Run the prompt's chunks one by one as described in the module docstring.

    ``sliding`` maps sliding-window layers to their window: they are never compressed, and each
    position sees the positions of its window.
    """
    sliding = sliding or {}
    decoder: Any = model.get_decoder()  # type: ignore[operator]
    modules = [layer.self_attn for layer in decoder.layers]
    n_layers = len(modules)
    b, length = input_ids.shape
    config: Any = model.config.get_text_config()  # type: ignore[operator]
    kv_heads, heads = int(config.num_key_value_heads), int(config.num_attention_heads)
    valid = attention_mask.bool()
    itself = torch.eye(length, dtype=torch.bool)
    visibility = {layer: itself[None, None].repeat(b, kv_heads, 1, 1) for layer in range(n_layers)}
    kept = {layer: torch.zeros(b, kv_heads, 0, dtype=torch.long) for layer in range(n_layers)}
    received = {layer: torch.zeros(b, heads, length) for layer in range(n_layers)}  # attention from earlier chunks
    peaks = dict.fromkeys(range(n_layers), 0)
    tracks = bool(getattr(strategy, "needs_accumulated_attention", False))
    logits = torch.empty(0)
    for start in range(0, length, chunk_size):
        end = min(length, start + chunk_size)
        chunk = torch.arange(start, end)
        for layer in range(n_layers):
            if layer in sliding:
                rows_i = chunk[:, None]
                near = (torch.arange(length)[None, :] <= rows_i) & (
                    rows_i - torch.arange(length)[None, :] < sliding[layer]
                )
                visibility[layer][:, :, start:end] = (near[None] & valid[:, None, :])[:, None]
                continue
            seen = torch.zeros(b, kv_heads, length + 1, dtype=torch.bool)
            seen.scatter_(-1, kept[layer].masked_fill(kept[layer] < 0, length), True)
            rows = seen[..., :length, None].transpose(-1, -2).expand(-1, -1, end - start, -1).clone()
            causal = (chunk[None, :] <= chunk[:, None])[None, None] & valid[:, None, None, start:end]
            rows[..., start:end] |= causal
            visibility[layer][:, :, start:end] = rows
        captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        logits = masked_logits(
            model, input_ids, attention_mask, visibility, extra_inputs, explicit_positions, capture=captured
        )
        real_seen = valid[:, :end].sum(-1).tolist()
        n_keep = tuple(budget(int(n), ratio) for n in real_seen)
        call_state: dict[str, Any] = {}  # shared by the chunk's layers (vl-cache's online totals)
        for layer in range(n_layers):
            if layer in sliding:
                continue
            query, key, value = captured[layer]
            columns = torch.cat([kept[layer], chunk.expand(b, kv_heads, -1)], dim=-1)  # [B, kvH, kv]
            head_modality = _gather_columns(modality[:, None, :].expand(-1, kv_heads, -1).contiguous(), columns)
            head_modality = head_modality.masked_fill(columns < 0, int(Modality.PADDING))
            keys = _gather_columns(key, columns)
            groups = heads // kv_heads
            carried = None
            if tracks:
                carried = _gather_columns(received[layer], columns.repeat_interleave(groups, dim=1))
                carried = carried.masked_fill(columns.repeat_interleave(groups, dim=1) < 0, 0.0)
            view = CacheView(
                layer_idx=layer,
                keys=keys,
                values=_gather_columns(value, columns),
                queries=query[:, :, start:end],
                scaling=float(modules[layer].scaling),
                head_modality=head_modality,
                n_keep=n_keep,
                carried_attention=carried,
                num_layers=n_layers,
                call_state=call_state,
            )
            peaks[layer] = max(peaks[layer], int(columns.shape[-1]))
            plan = strategy.plan(view)
            chosen = columns.gather(2, plan.kept_indices)
            kept[layer] = chosen.masked_fill(~plan.slot_valid[:, None, :], -1)
            if tracks:
                received[layer] += _chunk_column_sums(
                    query, key, visibility[layer], valid, start, end, float(modules[layer].scaling)
                )
    return ChunkedReference(kept, visibility, logits, peaks)


def _chunk_column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    visible: torch.Tensor,
    valid: torch.Tensor,
    start: int,
    end: int,
    scaling: float,
) -> torch.Tensor:
    """``[B, Hq, L]``: the attention the chunk's real queries gave each column (plain softmax over what they saw)."""
    heads, kv_heads = int(query.shape[1]), int(key.shape[1])
    keys = key.repeat_interleave(heads // kv_heads, dim=1).float()
    logits = query[:, :, start:end].float() @ keys.transpose(-1, -2) * scaling  # [B, Hq, q, L]
    seen = visible[:, :, start:end].repeat_interleave(heads // kv_heads, dim=1)
    probabilities = logits.masked_fill(~seen, float("-inf")).softmax(-1)
    counted = valid[:, None, start:end, None]
    # a padding query may see nothing (NaN): it does not count
    return torch.where(counted, probabilities, 0.0).sum(2)


def decode_visibility(
    reference: ChunkedReference, attention_mask: torch.Tensor, prompt_width: int
) -> dict[int, torch.Tensor]:
    """Per layer ``[B, kvH, T, T]`` over prompt + generated tokens: the prompt rows as the chunks saw them,
    then each generated token sees the final kept columns plus the generated tokens up to itself."""
    total = int(attention_mask.shape[1])
    valid = attention_mask.bool()
    result = {}
    for layer, prompt_rows in reference.visibility.items():
        b, kv_heads = prompt_rows.shape[:2]
        visible = torch.zeros(b, kv_heads, total, total, dtype=torch.bool)
        visible[:, :, :prompt_width, :prompt_width] = prompt_rows
        kept = reference.kept[layer]
        seen = torch.zeros(b, kv_heads, total + 1, dtype=torch.bool)
        seen.scatter_(-1, kept.masked_fill(kept < 0, total), True)
        for row in range(prompt_width, total):
            visible[:, :, row] = seen[..., :total]
            visible[:, :, row, prompt_width : row + 1] = valid[:, None, prompt_width : row + 1]
        result[layer] = visible
    return result


def kept_columns(plans: list[Any], chunk_size: int, prompt_width: int) -> torch.Tensor:
    """``[B, kvH, n]`` the prompt columns a layer holds after a chunked prefill, from its recorded plans
    (one per chunk, each choosing among the columns held before it and the chunk's), -1 at filler slots."""
    columns: torch.Tensor | None = None
    for index, start in enumerate(range(0, prompt_width, chunk_size)):
        applied = plans[index]
        b, kv_heads = applied.kept_indices.shape[:2]
        chunk = torch.arange(start, min(prompt_width, start + chunk_size)).expand(b, kv_heads, -1)
        held = chunk if columns is None else torch.cat([columns, chunk], dim=-1)
        assert applied.length_before == held.shape[-1], "a plan chose among another number of slots"
        columns = held.gather(2, applied.kept_indices).masked_fill(~applied.slot_valid[:, None, :], -1)
    assert columns is not None
    return columns
