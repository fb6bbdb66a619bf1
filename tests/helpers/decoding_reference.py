"""A naive ``decoding(inner)`` generation, replayed without a cache: the reference of the session's decode re-plans.

Given the generated sequence, the reference rebuilds what every layer held at every step with
its own bookkeeping (per row and KV head, the absolute columns held, -1 at filler slots):

- the prefill: the inner strategy plans the prompt (a plain view of the captured prompt queries
  and keys) with budget ``n`` if ``n < max_entries``, else ``max_entries - interval``;
- each decode step appends its own column; each step's query sees what was held then;
- when a layer holds ``max_entries`` columns after a step, the inner strategy plans a
  :class:`~kvpress_mm.ops.cache_view.CacheView` it assembles itself: the held columns' keys, the
  modality of each (prompt modality, generated tokens text, filler padding) per KV head, budget
  ``max_entries - interval`` per row, and the captured queries of the last
  ``min(interval, steps since the last re-plan)`` steps (whose columns must be the last ones
  held);

one masked no-cache forward (tests/helpers/masked_reference.py) per re-plan gives the queries
and keys, a last one the logits. Nothing of the session is used: only the strategy's ``plan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvpress_mm import LayerView
from kvpress_mm.modality import Modality
from kvpress_mm.ops.cache_view import CacheView
from tests.helpers.chunked_reference import budget
from tests.helpers.masked_reference import masked_logits


@dataclass
class DecodingReference:
    """The replayed generation."""

    logits: torch.Tensor  # [B, T, V]
    replans: dict[int, list[int]] = field(default_factory=dict)  # per layer: the decode steps followed by a re-plan
    most_held: dict[int, int] = field(default_factory=dict)  # per layer: the most columns held while attending


def _gather(tensor: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    index = columns.clamp(min=0)
    if tensor.dim() == 4:
        return tensor.gather(2, index[..., None].expand(-1, -1, -1, tensor.shape[-1]))
    return tensor.gather(2, index)


@torch.no_grad()
def decoding_reference(
    model: nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_modality: torch.Tensor,
    inner: Any,
    ratio: float,
    max_entries: int,
    interval: int,
    extra_inputs: dict[str, Any] | None = None,
    explicit_positions: bool = True,
) -> DecodingReference:
    """Replay ``sequences`` (prompt then generated tokens) as ``decoding(inner)`` generates them (module docstring)."""
    decoder: Any = model.get_decoder()  # type: ignore[operator]
    modules = [layer.self_attn for layer in decoder.layers]
    layers = range(len(modules))
    b, total = sequences.shape
    width = int(prompt_modality.shape[1])
    config: Any = model.config.get_text_config()  # type: ignore[operator]
    kv_heads = int(config.num_key_value_heads)
    target = max_entries - interval
    valid = attention_mask.bool()
    modality = torch.cat(
        [prompt_modality, torch.full((b, total - width), int(Modality.TEXT), dtype=prompt_modality.dtype)], dim=1
    )
    heads_modality = modality[:, None, :].expand(-1, kv_heads, -1).contiguous()
    causal = torch.ones(width, width, dtype=torch.bool).tril()[None] & valid[:, None, :width]
    visibility = {}
    for layer in layers:
        visible = torch.eye(total, dtype=torch.bool)[None, None].repeat(b, kv_heads, 1, 1)
        visible[:, :, :width, :width] = causal[:, None]
        visibility[layer] = visible

    def forward() -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        logits = masked_logits(
            model, sequences, attention_mask, visibility, extra_inputs, explicit_positions, capture=captured
        )
        return logits, captured

    result = DecodingReference(torch.empty(0))
    _, captured = forward()
    real = valid[:, :width].sum(-1).tolist()
    n_keep = tuple(n if n < max_entries else target for n in (budget(int(r), ratio) for r in real))
    held: dict[int, torch.Tensor] = {}
    for layer in layers:
        query, key, value = captured[layer]
        view = LayerView(
            layer_idx=layer,
            keys=key[:, :, :width],
            values=value[:, :, :width],
            queries=query[:, :, :width],
            scaling=float(modules[layer].scaling),
            modality=prompt_modality,
            n_keep=n_keep,
        )
        plan = inner.plan(view)
        held[layer] = plan.kept_indices.masked_fill(~plan.slot_valid[:, None, :], -1)
        result.replans[layer] = []
        result.most_held[layer] = 0
    since = dict.fromkeys(layers, 0)  # decode steps since the last re-plan
    for step, row in enumerate(range(width, total)):
        due = []
        for layer in layers:
            columns = torch.cat([held[layer], torch.full((b, kv_heads, 1), row)], dim=-1)
            seen = torch.zeros(b, kv_heads, total + 1, dtype=torch.bool)
            seen.scatter_(-1, columns.masked_fill(columns < 0, total), True)
            visibility[layer][:, :, row] = seen[..., :total]
            held[layer] = columns
            since[layer] += 1
            result.most_held[layer] = max(result.most_held[layer], int(columns.shape[-1]))
            if columns.shape[-1] >= max_entries:
                due.append(layer)
        if not due:
            continue
        _, captured = forward()
        for layer in due:
            query, key, value = captured[layer]
            columns = held[layer]
            buffered = min(interval, since[layer])
            rows = torch.arange(row - buffered + 1, row + 1)
            assert torch.equal(columns[..., -buffered:], rows.expand(b, kv_heads, -1)), "buffered rows are the last"
            view = CacheView(
                layer_idx=layer,
                keys=_gather(key, columns),
                values=_gather(value, columns),
                queries=query[:, :, rows],
                scaling=float(modules[layer].scaling),
                head_modality=_gather(heads_modality, columns).masked_fill(columns < 0, int(Modality.PADDING)),
                n_keep=(target,) * b,
            )
            plan = inner.plan(view)
            held[layer] = columns.gather(2, plan.kept_indices).masked_fill(~plan.slot_valid[:, None, :], -1)
            since[layer] = 0
            result.replans[layer].append(step)
    result.logits, _ = forward()
    return result
