"""Chunked prefill: the prompt fed to the text decoder in chunks, every layer compressed after each chunk.

A strategy with a ``prefill_chunk_size`` (the ``chunked-prefill`` wrapper) gets its prefill
split by the session. The vision-language model's own forward runs once: its vision tower sees
whole images, the image features are merged into the prompt's embeddings and the positions
(Qwen's multimodal RoPE included) are computed for the whole prompt, as without chunking. Only
the text decoder's call is split (:class:`ChunkedPrefill` stands in for its ``forward``): chunk
``c`` of ``chunk_size`` positions is fed with its slice of the embeddings (or token ids), of
the positions and of the family's per-position inputs (Qwen3-VL's deepstack features,
:meth:`~kvpress_mm.adapters.base.ModelAdapter.split_decoder_inputs`), on the cache the earlier
chunks left; the hidden states of all chunks are concatenated, so the logits are those of every
position.

In each layer, chunk ``c``'s queries attend to what the layer holds after chunk ``c - 1`` (already
compressed: that is the point, a bounded cache) plus the chunk itself, causally; then the
strategy plans the whole layer on a :class:`~kvpress_mm.ops.cache_view.CacheView` (the cached
slots plus the chunk, the chunk's queries) with the budgets of the prompt seen so far
(the strategy's budgets of positions ``< end``; after the last chunk exactly the whole prompt's), and the
plan is applied right after the layer's attention. A layer therefore never holds more than its
budget after chunk ``c - 1`` plus one chunk. Strategies that declare
``needs_accumulated_attention`` get the attention each entry received from the queries of all
chunks so far (carried across chunks along the kept entries), not only the current chunk's.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvpress_mm.adapters.base import ModelAdapter
from kvpress_mm.cache.growing import grow_in_place
from kvpress_mm.cache.surgery import apply_plan, compressible, kv_bytes, unsupported_cache_layer
from kvpress_mm.errors import InvalidInputError
from kvpress_mm.modality import Modality
from kvpress_mm.ops.cache_view import CacheView
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.session.attention import SLIDING_LAYERS_LEFT, AttentionCall, sliding_window_call
from kvpress_mm.session.calls import CallInfo
from kvpress_mm.session.prefill import check_plan
from kvpress_mm.session.slots import modality_after_plan, slot_modality
from kvpress_mm.session.state import CacheState, LayerState, attach_state, rollback_refusal, state_of

#: Names under which text decoders take the cache (transformers 5.25+: ``cache``).
CACHE_ARGUMENTS = ("cache", "past_key_values")
#: Decoder inputs split along the sequence here (other per-position inputs are the adapter's).
_SEQUENCE_INPUTS = ("input_ids", "inputs_embeds")


@dataclass
class Chunk:
    """One chunk of a chunked prefill, as the layers see it."""

    index: int
    start: int
    end: int
    last: bool
    new_valid: torch.Tensor  # [B, end - start] bool: the chunk's real tokens
    modality: torch.Tensor  # [B, end - start] int8
    n_keep: tuple[int, ...]  # each row's budget after this chunk
    call_state: dict[str, Any]  # shared by the views of the chunk's layers (LayerView.call_state)


@dataclass
class _PendingChunkPlan:
    plan: CompressionPlan
    before: torch.Tensor  # [B, kvH, kv] modality of the slots the plan chose from
    layer_state: LayerState
    keys: torch.Tensor  # [B, kvH, kv, D] the entries the plan indexes (full precision, also on a quantized layer)
    values: torch.Tensor


class ChunkedPrefill:
    """Feeds a prefill call's prompt to the text decoder in chunks and plans every layer after each.

    The session creates one when its strategy has a ``prefill_chunk_size``, :meth:`install` s it
    on the model's text decoder, :meth:`arm` s it at each prefill call, and routes a layer's
    attention (:meth:`attend`) and post-attention hook (:meth:`after_attention`) here while a
    chunk runs (:attr:`current`).
    """

    def __init__(self, strategy: Any, chunk_size: int, growing_cache: bool, num_layers: int | None = None) -> None:
        if chunk_size < 1:
            raise ValueError(f"prefill chunk size must be >= 1, got {chunk_size}")
        self.strategy = strategy
        self.chunk_size = int(chunk_size)
        self.growing_cache = growing_cache
        self.num_layers = num_layers
        self.current: Chunk | None = None
        self._call: CallInfo | None = None
        self._report: Any = None
        self._adapter: ModelAdapter | None = None
        self._model: nn.Module | None = None
        self._layers: dict[int, LayerState] = {}
        self._carried: dict[int, torch.Tensor] = {}
        self._pending: dict[int, _PendingChunkPlan] = {}
        self._warned_sliding = False

    # -- installation --------------------------------------------------------------------

    def install(self, adapter: ModelAdapter, model: nn.Module) -> Callable[[], None]:
        """Stand in for the text decoder's ``forward`` (on that instance only); returns the undo function."""
        decoder = adapter.text_decoder(model)
        own = vars(decoder).get("forward")
        original = decoder.forward
        parameters = list(inspect.signature(original).parameters)
        self._adapter, self._model = adapter, model

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._call is None:
                return original(*args, **kwargs)
            call, self._call = self._call, None  # one prefill, one chunked decoder call
            inputs = {**dict(zip(parameters, args)), **kwargs}
            return self._run_chunks(original, call, inputs, parameters)

        object.__setattr__(decoder, "forward", forward)

        def undo() -> None:
            if vars(decoder).get("forward") is forward:
                if own is None:
                    object.__delattr__(decoder, "forward")
                else:
                    object.__setattr__(decoder, "forward", own)

        return undo

    def arm(self, call: CallInfo | None, report: Any = None) -> None:
        """Chunk the text decoder's next call (``call``: the prefill's description), or nothing (``None``)."""
        self._call = call if call is not None and call.prefill and call.q_len > self.chunk_size else None
        self._report = report
        self.current = None
        self._layers.clear()
        self._carried.clear()
        self._pending.clear()

    # -- the decoder call, chunk by chunk ---------------------------------------------------

    def _run_chunks(
        self, original: Callable[..., Any], call: CallInfo, inputs: dict[str, Any], parameters: list[str]
    ) -> Any:
        assert call.modality is not None and self._adapter is not None and self._model is not None
        tokens = next((inputs[n] for n in _SEQUENCE_INPUTS if isinstance(inputs.get(n), torch.Tensor)), None)
        if tokens is None or int(tokens.shape[1]) != call.q_len:
            raise InvalidInputError(
                "chunked prefill: the text decoder got another number of positions than the prompt has "
                f"({None if tokens is None else int(tokens.shape[1])} vs {call.q_len})"
            )
        if inputs.get("use_cache") is False:
            return original(**inputs)  # no cache, nothing to compress: the plain forward
        cache_name = next((n for n in CACHE_ARGUMENTS if n in parameters), CACHE_ARGUMENTS[0])
        length, batch = call.q_len, call.batch_size
        if inputs.get("position_ids") is None:
            # what the decoder derives on an empty cache, written out: later chunks would start
            # at the (compressed) cache length
            inputs["position_ids"] = torch.arange(length, device=tokens.device)[None].expand(batch, -1)
        hidden: list[torch.Tensor] = []
        output: Any = None
        starts = list(range(0, length, self.chunk_size))
        for index, start in enumerate(starts):
            end = min(length, start + self.chunk_size)
            chunk_inputs = self._chunk_inputs(inputs, start, end, length)
            if index:
                chunk_inputs[cache_name] = _cache_of(output)
            self.current = self._chunk(call, index, start, end, last=end == length)
            try:
                output = original(**chunk_inputs)
            finally:
                self.current = None
            if getattr(output, "hidden_states", None) is not None or getattr(output, "attentions", None) is not None:
                raise InvalidInputError(
                    "output_hidden_states / output_attentions are not supported with a chunked prefill "
                    "(each chunk attends to a compressed cache); drop them"
                )
            hidden.append(output.last_hidden_state)
        output.last_hidden_state = torch.cat(hidden, dim=1)
        return output

    def _chunk_inputs(self, inputs: Mapping[str, Any], start: int, end: int, length: int) -> dict[str, Any]:
        """The decoder's inputs for positions ``start .. end - 1`` of a ``length``-position prompt."""
        assert self._adapter is not None and self._model is not None
        chunk = dict(inputs)
        for name in _SEQUENCE_INPUTS:
            if isinstance(inputs.get(name), torch.Tensor):
                chunk[name] = inputs[name][:, start:end]
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            chunk["attention_mask"] = mask[:, :end]  # the mask of every position seen, as generate's chunks do
        chunk["position_ids"] = inputs["position_ids"][..., start:end]
        family = self._adapter.split_decoder_inputs(self._model, inputs, start, end)
        chunk.update(family)
        handled = {*_SEQUENCE_INPUTS, "attention_mask", "position_ids", *family}
        for name, value in inputs.items():
            if name not in handled and isinstance(value, torch.Tensor) and length in tuple(value.shape[:2]):
                raise InvalidInputError(
                    f"chunked prefill cannot split the text decoder's input {name!r} (shape {tuple(value.shape)}) "
                    "into chunks; use a strategy without prefill chunks for this model"
                )
        return chunk

    def _chunk(self, call: CallInfo, index: int, start: int, end: int, last: bool) -> Chunk:
        assert call.modality is not None
        modality = call.modality[:, start:end]
        # the budgets of the prompt seen so far; after the last chunk, the whole prompt's
        n_keep = call.n_keep if last else tuple(self.strategy.budgets(call.modality[:, :end]))
        state = call.strategy_state if last else {}
        return Chunk(index, start, end, last, modality != Modality.PADDING, modality, n_keep, state)

    # -- one layer, one chunk ---------------------------------------------------------------

    def attend(self, attention: AttentionCall, cache: Any) -> tuple[torch.Tensor, Any]:
        """The chunk's attention in one layer (on the compressed earlier chunks), then the layer's plan."""
        chunk = self.current
        assert chunk is not None
        layer_idx, key = attention.layer_idx, attention.key
        layer = cache.layers[layer_idx]
        if sliding_window_call(attention, cache):
            if chunk.last and self._report is not None:
                self._report.layers_skipped += 1
            if not self._warned_sliding:
                warnings.warn(SLIDING_LAYERS_LEFT, stacklevel=2)
                self._warned_sliding = True
            return attention.run_original(attention.attention_mask)
        if not compressible(layer):
            raise unsupported_cache_layer(layer, layer_idx)
        previous = self._layers.get(layer_idx)
        q_len = chunk.end - chunk.start
        cached = int(key.shape[2]) - q_len
        expected = 0 if previous is None else previous.length
        if cached != expected:
            raise InvalidInputError(
                f"layer {layer_idx} holds {cached} entries before prefill chunk {chunk.index}, kvpress-mm expected "
                f"{expected}: the cache was changed outside the compressor"
            )
        batch, kv_heads, device = int(key.shape[0]), int(key.shape[1]), key.device
        new_valid = chunk.new_valid.to(device)
        if previous is None:
            output = attention.run_original(attention.attention_mask)  # the first chunk: a plain prefill
            cached_valid = torch.ones(batch, 0, dtype=torch.bool, device=device)
            cached_modality = torch.zeros(batch, kv_heads, 0, dtype=torch.int8, device=device)
        else:
            cached_valid = previous.cached_valid(batch, device)
            output = attention.run_original(_chunk_mask(cached_valid, new_valid, attention))
            cached_modality = slot_modality(previous.slot_modality, previous.slot_valid, batch, kv_heads, cached)
        head_modality = torch.cat(
            [cached_modality.to(device), chunk.modality.to(device)[:, None, :].expand(-1, kv_heads, -1)], dim=-1
        )
        carried = self._carried.get(layer_idx)
        tracks = bool(getattr(self.strategy, "needs_accumulated_attention", False))
        if tracks and carried is None:
            carried = torch.zeros(batch, int(attention.query.shape[1]), 0, device=device)
        if carried is not None:
            carried = torch.cat([carried, carried.new_zeros(*carried.shape[:2], q_len)], dim=-1)
        view = CacheView(
            layer_idx=layer_idx,
            keys=key,
            values=attention.value,
            queries=attention.query,
            scaling=attention.scaling,
            head_modality=head_modality,
            n_keep=chunk.n_keep,
            state=previous.strategy_state if previous is not None else None,
            carried_attention=carried,
            num_layers=self.num_layers,
            call_state=chunk.call_state,
        )
        plan = self.strategy.plan(view)
        check_plan(type(self.strategy).__name__, plan, view)
        if tracks:
            self._carried[layer_idx] = _gather_per_query_head(view.accumulated_attention_per_head(), plan)
        layer_state = LayerState(int(key.shape[2]), None, chunk.n_keep, view.state)
        self._pending[layer_idx] = _PendingChunkPlan(plan, head_modality, layer_state, key, attention.value)
        return output

    def after_attention(self, layer_idx: int, cache: Any, call: CallInfo) -> None:
        """Apply the layer's plan of the current chunk; after the last chunk, hand the layer to the session."""
        chunk, pending = self.current, self._pending.pop(layer_idx, None)
        if chunk is None or pending is None:
            return
        layer = cache.layers[layer_idx]
        report = self._report
        if report is not None:
            held = sum(kv_bytes(each) for each in cache.layers)
            report.kv_bytes_peak = max(report.kv_bytes_peak, held)
        length = int(pending.keys.shape[-2])  # the layer with the chunk: what the plan chose from
        before = kv_bytes(layer)
        plan, layer_state = pending.plan, pending.layer_state
        apply_plan(layer, plan, pending.keys, pending.values)
        layer_state.slot_modality = modality_after_plan(pending.before, plan)
        layer_state.set_slots(plan.slot_valid)
        self._layers[layer_idx] = layer_state
        if not chunk.last:
            return
        assert call.modality is not None
        state = state_of(cache)
        if state is None:
            next_positions = (call.modality != Modality.PADDING).sum(-1)
            state = CacheState(
                call.q_len,
                prompt_columns=call.q_len,
                crop_refusal=rollback_refusal(self.strategy),
                next_positions=next_positions,
                prompt_record=call.prompt_record,
            )
            attach_state(cache, state)
        state.layers[layer_idx] = layer_state
        if self.growing_cache:
            grow_in_place(layer)
        if report is not None:
            report.layers_compressed += 1
            # what the layer would hold without compression: the whole prompt
            report.kv_bytes_before += before * call.q_len // max(1, length)
            report.kv_bytes_after += kv_bytes(layer)


def _cache_of(output: Any) -> Any:
    for name in CACHE_ARGUMENTS:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    raise InvalidInputError("chunked prefill needs the text decoder to return its cache (use_cache=True)")


def _chunk_mask(cached_valid: torch.Tensor, new_valid: torch.Tensor, attention: AttentionCall) -> torch.Tensor:
    """The 4-D mask of a chunk on a compressed layer: valid cached slots, the chunk causally.

    A padding position also sees itself, so that a row whose cache and chunk are all padding so
    far gets no empty softmax (NaN); no real position ever sees a padding one.
    """
    q_len = int(new_valid.shape[1])
    device = cached_valid.device
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
    itself = torch.eye(q_len, dtype=torch.bool, device=device)
    new = (causal[None] & new_valid[:, None, :]) | itself[None]
    visible = torch.cat([cached_valid[:, None, :].expand(-1, q_len, -1), new], dim=-1)[:, None]
    if attention.wrapped == "sdpa":
        return visible
    dtype = attention.query.dtype
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)


def _gather_per_query_head(per_head: torch.Tensor, plan: CompressionPlan) -> torch.Tensor:
    """``[B, Hq, kv]`` at the plan's kept slots (each query head follows its KV head's choice), 0 at filler slots."""
    kept = plan.kept_indices.to(per_head.device)
    groups = int(per_head.shape[1]) // int(kept.shape[1])
    gathered = per_head.gather(2, kept.repeat_interleave(groups, dim=1))
    return gathered.masked_fill(~plan.slot_valid.to(per_head.device)[:, None, :], 0.0)
