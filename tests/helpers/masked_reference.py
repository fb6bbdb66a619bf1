"""Independent references for end-to-end tests: recorded plans and per-head masked forwards.

The reference for an eviction-only compressed generation is a full forward WITHOUT a cache
over prompt + generated tokens, in which each decode-step query sees only the prompt entries
its layer's KV head kept (plus everything generated since). The hidden entries differ per
layer and per KV head, which a 2-D ``attention_mask`` cannot express, so the reference runs
through a test-only attention function registered with transformers' ``AttentionInterface``
that replaces the model's mask by a per-layer, per-head boolean mask prepared here.

The kept indices come from recording every plan the session applies to a cache layer
(``apply_plan`` wrapped by :class:`PlanRecorder`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import kvpress_mm.cache.surgery as cache_surgery
import kvpress_mm.session.chunked as chunked_module
import kvpress_mm.session.context as session_module

REF_PREFIX = "e2e_reference_"

# per-layer [B, kvH, T, T] bool masks for the reference forward in progress
_REF_MASKS: dict[int, torch.Tensor] = {}
# per-layer (post-RoPE query [B, Hq, T, D], key [B, kvH, T, D], value) of the reference forward, when asked for
_CAPTURED: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def cache_of(output: Any) -> Any:
    """The cache of a generate output (``output.cache``; ``past_key_values`` is deprecated from transformers 5.24)."""
    return output.cache


# -- recording the plans the session applies ------------------------------------------------


@dataclass
class AppliedPlan:
    """One ``apply_plan`` call: the cache layer object, the plan, and lengths around it."""

    layer: Any
    kept_indices: torch.Tensor  # [B, kvH, n_slots]
    slot_valid: torch.Tensor  # [B, n_slots]
    merged: bool
    length_before: int
    length_after: int
    keys: torch.Tensor | None = None  # the plan's merged keys / values (LOOK-M merges), if any
    values: torch.Tensor | None = None
    head_valid: torch.Tensor | None = None  # [B, kvH, n_slots] of a ragged plan (adakv)

    def valid_per_head(self) -> torch.Tensor:
        """``[B, kvH, n_slots]``: which slots of each head are real."""
        if self.head_valid is not None:
            return self.head_valid
        return self.slot_valid[:, None, :].expand_as(self.kept_indices)


class PlanRecorder:
    """Records every plan the session applies (by wrapping ``kvpress_mm.session.apply_plan``)."""

    def __init__(self) -> None:
        self.applied: list[AppliedPlan] = []

    @contextmanager
    def recording(self) -> Iterator[PlanRecorder]:
        # the session imports apply_plan by name; patch that name and the defining module's
        modules = [session_module, chunked_module, cache_surgery]
        original = cache_surgery.apply_plan
        assert session_module.apply_plan is original, "the session no longer applies plans through apply_plan"

        def recording_apply_plan(layer: Any, plan: Any, *source: Any) -> None:
            before = int(layer.get_seq_length())
            original(layer, plan, *source)
            self.applied.append(
                AppliedPlan(
                    layer=layer,
                    kept_indices=plan.kept_indices.detach().clone(),
                    slot_valid=plan.slot_valid.detach().clone(),
                    merged=plan.keys is not None or plan.values is not None,
                    length_before=before,
                    length_after=int(layer.get_seq_length()),  # a ragged layer: its longest head
                    keys=plan.keys,
                    values=plan.values,
                    head_valid=None if plan.head_valid is None else plan.head_valid.detach().clone(),
                )
            )

        for module in modules:
            module.apply_plan = recording_apply_plan  # type: ignore[attr-defined]
        try:
            yield self
        finally:
            for module in modules:
                module.apply_plan = original  # type: ignore[attr-defined]

    def per_layer(self, cache: Any) -> dict[int, list[AppliedPlan]]:
        """The recorded plans of ``cache``'s layers, in application order, keyed by layer index."""
        result: dict[int, list[AppliedPlan]] = {}
        for applied in self.applied:
            matches = [i for i, layer in enumerate(cache.layers) if layer is applied.layer]
            if matches:
                result.setdefault(matches[0], []).append(applied)
        return result


# -- visibility masks -------------------------------------------------------------------------


def prompt_visibility(attention_mask: torch.Tensor, prompt_width: int, total: int) -> torch.Tensor:
    """``[B, T, T]`` causal visibility of the prompt rows (padding keys hidden)."""
    b = attention_mask.shape[0]
    valid = attention_mask.bool()
    vis = torch.zeros(b, total, total, dtype=torch.bool)
    causal = torch.ones(prompt_width, prompt_width, dtype=torch.bool).tril()
    vis[:, :prompt_width, :prompt_width] = causal[None] & valid[:, None, :prompt_width]
    return vis


def plain_visibility(attention_mask: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """``[B, T, T]`` causal visibility over the whole sequence (optionally a sliding window)."""
    total = attention_mask.shape[1]
    i = torch.arange(total)
    vis = (i[None, :] <= i[:, None])[None] & attention_mask.bool()[:, None, :]
    if sliding_window is not None:
        vis &= (i[:, None] - i[None, :] < sliding_window)[None]
    return vis


def compressed_visibility(
    plans: Sequence[AppliedPlan],
    attention_mask: torch.Tensor,
    prompt_width: int,
    call_lengths: Sequence[int],
    decode_plans: bool,
) -> torch.Tensor:
    """``[B, kvH, T, T]``: what each query saw in a layer compressed after prefill.

    Simulates the layer's cache as absolute columns per row and KV head: after prefill it
    holds the first plan's kept columns; each later call appends its tokens after its
    queries attended (each query sees the cache plus the call's tokens up to itself); with
    ``decode_plans`` each later call is followed by one recorded plan (``h2o`` decode eviction).
    """
    total = attention_mask.shape[1]
    first = plans[0]
    assert first.length_before == prompt_width, "the first recorded plan must be the prefill plan"
    b, kv_heads, _ = first.kept_indices.shape
    vis = prompt_visibility(attention_mask, prompt_width, total)[:, None].repeat(1, kv_heads, 1, 1)
    columns = first.kept_indices.masked_fill(~first.valid_per_head(), -1)  # [B, kvH, n]
    remaining = list(plans[1:])
    col = prompt_width
    for q_len in call_lengths:
        new = torch.arange(col, col + q_len)
        # the cached columns as a [B, kvH, T] bool (filler slots, -1, go to a dropped extra column)
        cached = torch.zeros(b, kv_heads, total + 1, dtype=torch.bool)
        cached.scatter_(-1, columns.masked_fill(columns < 0, total), True)
        cached[..., :total] &= attention_mask.bool()[:, None, :]  # padding tokens of a call stay hidden
        for i in range(q_len):
            vis[:, :, col + i] = cached[..., :total]
            vis[:, :, col + i, col : col + i + 1] = attention_mask.bool()[:, None, col : col + i + 1]
        columns = torch.cat([columns, new.expand(b, kv_heads, -1)], dim=-1)
        if decode_plans:
            step = remaining.pop(0)
            assert step.length_before == columns.shape[-1], "decode plans out of step with the calls"
            columns = columns.gather(-1, step.kept_indices).masked_fill(~step.valid_per_head(), -1)
        col += q_len
    assert col == total, f"calls cover {col} columns, the attention mask has {total}"
    assert not remaining, f"{len(remaining)} recorded plans left over"
    return vis


def kept_prompt_columns(plans: Sequence[AppliedPlan]) -> list[list[torch.Tensor]]:
    """Per row, per KV head: the prompt columns the prefill plan kept (filler slots dropped)."""
    first = plans[0]
    b, kv_heads, _ = first.kept_indices.shape
    valid = first.valid_per_head()
    return [[first.kept_indices[r, h][valid[r, h]] for h in range(kv_heads)] for r in range(b)]


# -- the masked reference forward -------------------------------------------------------------


def _reference_attention(wrapped: str) -> Any:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        visible = _REF_MASKS[int(module.layer_idx)]  # type: ignore[arg-type]
        if _CAPTURED is not None:
            captured = (query.detach().clone(), key.detach().clone(), value.detach().clone())
            _CAPTURED[int(module.layer_idx)] = captured  # type: ignore[arg-type]
        groups = query.shape[1] // visible.shape[1]
        visible = visible.repeat_interleave(groups, dim=1).to(query.device)  # query head h -> kv head h // groups
        if wrapped == "sdpa":
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, visible, **kwargs)
        eager = sys.modules[type(module).__module__].eager_attention_forward
        mask = torch.zeros(visible.shape, dtype=query.dtype).masked_fill(~visible, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, mask, **kwargs)

    return attention


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for wrapped, mask_function in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        AttentionInterface.register(REF_PREFIX + wrapped, _reference_attention(wrapped))
        AttentionMaskInterface.register(REF_PREFIX + wrapped, mask_function)
    _registered = True


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Absolute positions as generate derives them from a left-padded 2-D mask."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


@torch.no_grad()
def masked_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visibility: dict[int, torch.Tensor],
    extra_inputs: dict[str, Any] | None = None,
    explicit_positions: bool = True,
    capture: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Logits ``[B, T, V]`` of a no-cache forward where layer ``l``'s queries see ``visibility[l]``.

    ``visibility[l]`` is ``[B, kvH, T, T]`` or ``[B, T, T]`` bool. Padding query rows are made
    to see themselves only (their outputs are never looked at, but must not be NaN).

    Vision-language models: ``extra_inputs`` go to the forward as they are (``pixel_values``,
    ``image_sizes``, ``mm_token_type_ids`` covering all ``T`` positions, ...); only the text
    decoder switches to the reference attention. ``explicit_positions=False`` lets the model
    derive positions itself (Qwen's multimodal RoPE from ``get_rope_index``). ``capture``
    receives each layer's post-RoPE ``(query, key, value)`` of the forward.
    """
    global _CAPTURED
    _register()
    config: Any = model.config.get_text_config()  # type: ignore[union-attr,operator]
    multimodal = bool(getattr(model.config, "sub_configs", None))
    implementation = str(config._attn_implementation)
    assert implementation in ("sdpa", "eager"), implementation
    kv_heads = int(config.num_key_value_heads)
    total = input_ids.shape[1]
    pad_rows = ~attention_mask.bool()  # [B, T]
    eye = torch.eye(total, dtype=torch.bool)
    masks = {}
    for layer_idx, vis in visibility.items():
        if vis.dim() == 3:
            vis = vis[:, None].expand(-1, kv_heads, -1, -1)
        vis = vis.clone()
        vis[pad_rows[:, None, :, None].expand_as(vis) & ~eye.expand_as(vis)] = False
        vis |= pad_rows[:, None, :, None] & eye
        masks[layer_idx] = vis
    _REF_MASKS.clear()
    _REF_MASKS.update(masks)

    def switch(name: str) -> None:
        model.set_attn_implementation({"text_config": name} if multimodal else name)  # type: ignore[operator]

    inputs: dict[str, Any] = dict(extra_inputs or {})
    if explicit_positions:
        inputs["position_ids"] = positions_from_mask(attention_mask)
    switch(REF_PREFIX + implementation)
    _CAPTURED = capture
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs).logits
    finally:
        switch(implementation)
        _REF_MASKS.clear()
        _CAPTURED = None
    return logits.float()


@torch.no_grad()
def plain_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of a no-cache forward with plain causal (and padding) masking."""
    n_layers = len(model.get_decoder().layers)  # type: ignore[operator]
    vis = plain_visibility(attention_mask)
    return masked_logits(model, input_ids, attention_mask, dict.fromkeys(range(n_layers), vis))


def decode_step_logits(reference: torch.Tensor, prompt_width: int, steps: int) -> torch.Tensor:
    """``[steps, B, V]``: the reference logits that produce generated tokens ``0 .. steps-1``."""
    return reference[:, prompt_width - 1 : prompt_width - 1 + steps].transpose(0, 1)
