"""The compressor session: hooks in on enter, out on exit; applies plans; keeps the report.

On enter, the text decoder's attention is routed through the session's wrapper
(:mod:`kvpress_mm.session.attention`) and three kinds of hooks are installed:

- a forward pre-hook on the model describes each call (:mod:`kvpress_mm.session.calls`): the
  modality map and budgets at prefill, which new tokens are real, and checks that a call on a
  compressed cache is well-formed;
- a forward pre-hook on each attention module records the cache object in use;
- a forward hook on each attention module applies the layer's pending plan to the cache,
  right after the layer's attention has used the full prompt (:mod:`kvpress_mm.session.prefill`)
  or after a decode step's eviction (:mod:`kvpress_mm.session.decode`). For a strategy that
  defers its plans (``vl-cache``), the hook of the last decoder layer plans and compresses
  every layer at once, at the end of the prefill call.

What the session keeps per compressed cache lives on the cache (:mod:`kvpress_mm.session.state`).
On exit, also when generation raised, everything is removed and the model is as it was found.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from kvpress_mm.adapters.base import ModelAdapter
from kvpress_mm.cache.growing import grow_in_place
from kvpress_mm.cache.surgery import apply_plan, check_cache_layers, check_decode_eviction, kv_bytes
from kvpress_mm.errors import CompressorAlreadyActiveError, UnsupportedModelError
from kvpress_mm.modality import Modality
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.views import DecodeView, LayerView
from kvpress_mm.registry import find_adapter
from kvpress_mm.session.attention import (
    ACTIVE,
    ATTENTION_PREFIX,
    SLIDING_LAYERS_LEFT,
    WRAPPABLE_IMPLEMENTATIONS,
    AttentionCall,
    MaskChecks,
    register_attention_functions,
    sliding_window_call,
)
from kvpress_mm.session.calls import CallInfo, call_tokens, continuation_call, prefill_call
from kvpress_mm.session.chunked import ChunkedPrefill
from kvpress_mm.session.decode import attend_compressed
from kvpress_mm.session.generation import Drafting, instrument_generate, require_cache_backend
from kvpress_mm.session.prefill import fused_prefill_attention, plan_deferred_layers, plan_layer, prefill_view
from kvpress_mm.session.ragged import attend_ragged, claim_ragged_layer, ragged_layer
from kvpress_mm.session.slots import follow_plan
from kvpress_mm.session.state import LayerState, state_of


class Strategy(Protocol):
    """What a session needs of a strategy (every :class:`~kvpress_mm.Compressor` is one)."""

    @property
    def is_noop(self) -> bool:
        """True when the strategy never changes the cache."""

    @property
    def acts_while_decoding(self) -> bool:
        """True when :meth:`decode_plan` may change the cache."""

    @property
    def evicts_while_decoding(self) -> bool:
        """True when :meth:`decode_plan` may evict entries (refused with quanto / HQQ caches and rollbacks)."""

    @property
    def defers_plans(self) -> bool:
        """True when the strategy plans every layer at the end of the prefill."""

    @property
    def plans_ragged_heads(self) -> bool:
        """True when plans may give KV heads different budgets (only a DynamicCache stores them)."""

    @property
    def decode_eviction_remedy(self) -> str:
        """The sentence that tells how to build the strategy without decode-time eviction."""

    def budgets(self, modality: torch.Tensor) -> tuple[int, ...]:
        """Each row's budget for a prefill with this modality map."""

    def plan(self, layer: LayerView) -> CompressionPlan:
        """The layer's plan after its prefill."""

    def observe(self, layer: LayerView) -> None:
        """Record a layer's statistics for :meth:`plan_deferred`."""

    def plan_deferred(self, layers: Sequence[LayerView]) -> list[CompressionPlan]:
        """Every observed layer's plan, at the end of the prefill."""

    def decode_plan(self, layer: DecodeView) -> CompressionPlan | None:
        """An eviction after a decode step, or ``None``."""

    @property
    def prefill_chunk_size(self) -> int | None:
        """Positions per prefill chunk, or ``None`` for a prefill in one call."""


@dataclass
class CompressionReport:
    """What the last prefill compression did (summed over layers).

    A new report replaces the previous one at every prefill (a model call on an empty cache)
    made inside the session; calls that continue a cache leave it as it is.

    Attributes:
        layers_compressed: decoder layers whose cache was compressed.
        layers_skipped: decoder layers left uncompressed (sliding-window layers).
        kv_bytes_before: bytes of the compressed layers' keys and values right after the
            prefill, before compression (on a quantized cache, what it stores: the prompt as
            transformers quantized it).
        kv_bytes_after: the same layers' bytes right after compression.
        prompt_lengths: real (non-padding) prompt tokens of each row of the batch.
        n_keep: cache entries each row keeps per layer and KV head (its budget).
        kv_bytes_peak: the most bytes the keys and values of all the cache's layers held at
            once during the prefill (measured at each compressed layer's attention, new
            entries included): with a per-layer compression, the earlier layers are already
            compressed while a layer attends to the whole prompt; with a chunked prefill, no
            layer holds more than its budget plus one chunk.

    """

    layers_compressed: int = 0
    layers_skipped: int = 0
    kv_bytes_before: int = 0
    kv_bytes_after: int = 0
    prompt_lengths: tuple[int, ...] = ()
    n_keep: tuple[int, ...] = ()
    kv_bytes_peak: int = 0

    @property
    def ratio_kept(self) -> float:
        """``kv_bytes_after / kv_bytes_before`` (1.0 before any compression)."""
        return self.kv_bytes_after / self.kv_bytes_before if self.kv_bytes_before else 1.0


class CompressionSession:
    """A model under compression: a context manager returned by ``compressor(model)``.

    ```python
    with compressor(model) as session:
        out = model.generate(**inputs, max_new_tokens=32)
    print(session.report.kv_bytes_before, session.report.kv_bytes_after)
    ```

    With ``growing_cache`` (the default), each layer compressed at prefill is moved into a
    :class:`~kvpress_mm.cache.growing.GrowingLayer` whose storage is exactly the kept entries; the
    first decode step reallocates once with a little headroom, and later steps append in place
    instead of copying the whole cache (``DynamicLayer``'s ``torch.cat``); ``False`` keeps
    transformers' ``DynamicLayer``. Outputs are identical.

    (Why one class of about 300 lines: its hooks share one call's state - the call's
    description, the pending plans, the report - and stay in order only when one object owns
    it; what they do is in the neighbouring modules: calls, prefill, decode, ragged, chunked.)
    """

    #: Compute the prefill attention of strategies that need the all-query column sums with our
    #: chunked attention (output and sums from one softmax). Tests turn it off to compare with
    #: the lazy path (the model's attention, then a second pass for the sums).
    fused_prefill: ClassVar[bool] = True

    def __init__(self, compressor: Strategy, model: nn.Module, *, growing_cache: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"compressor(model) needs a transformers model (torch.nn.Module), got {type(model).__name__}"
            )
        self.compressor = compressor
        self.model = model
        self.report = CompressionReport()
        self._adapter: ModelAdapter | None = None
        self._original_implementation: str | None = None
        self._modules: list[nn.Module] = []
        self._handles: list[Any] = []
        self._undo: list[Callable[[], None]] = []  # removes the adapter's instrumentation
        self._call: CallInfo | None = None
        self._cache: Any = None
        # per layer: its plan (if any), its state after the call, whether at prefill, and the
        # keys and values the plan indexes (the attention call's: a quantized layer holds them quantized)
        self._pending: dict[
            int, tuple[CompressionPlan | None, LayerState, bool, torch.Tensor | None, torch.Tensor | None]
        ] = {}
        # views observed during the prefill of a strategy that defers its plans (planned after the last layer)
        self._deferred: list[LayerView] = []
        self._num_layers = 0
        self._last_layer = -1
        self._warned_sliding = False
        self._masks = MaskChecks()
        self._drafting = Drafting()  # an assistant model's prefill is in progress
        # compressed layers move into a GrowingLayer: decode steps append in place (no torch.cat copy)
        self._growing_cache = growing_cache
        self._chunker: ChunkedPrefill | None = None  # the prefill in chunks (strategies with prefill_chunk_size)

    # -- entering and leaving -------------------------------------------------------------

    def __enter__(self) -> CompressionSession:
        if ACTIVE.for_model(self.model) is not None:
            raise CompressorAlreadyActiveError(
                f"a kvpress-mm compressor is already active on this {type(self.model).__name__}; "
                "leave its `with` block before entering another"
            )
        adapter = find_adapter(self.model)
        original = adapter.attention_implementation(self.model)
        if original not in WRAPPABLE_IMPLEMENTATIONS:
            raise UnsupportedModelError(
                f"attention implementation {original!r} is not supported under compression; "
                "load the model with attn_implementation='sdpa' (default) or 'eager', "
                "or call model.set_attn_implementation('sdpa')"
            )
        self._adapter = adapter
        try:
            self._modules = adapter.attention_modules(self.model)
            # the text decoder's layers: per-layer budgets are computed from the layer index and this
            self._num_layers = len(self._modules)
            self._last_layer = max((int(m.layer_idx) for m in self._modules), default=-1)  # type: ignore[arg-type]
            register_attention_functions()
            adapter.set_attention_implementation(self.model, ATTENTION_PREFIX + original)
            self._original_implementation = original
            self._handles.append(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
            # a missing quantized-cache backend raises an ImportError naming the [quant] extra, no-op or not
            instruments = [require_cache_backend]
            if not self.compressor.is_noop:
                instruments += [
                    adapter.instrument,
                    lambda model: instrument_generate(model, self.compressor, self._drafting),
                ]
            for instrument in instruments:
                undo = instrument(self.model)
                if undo is not None:
                    self._undo.append(undo)
            if not self.compressor.is_noop:
                self._install_chunked_prefill(adapter)
            for module in self._modules:
                self._handles.append(module.register_forward_pre_hook(self._before_attention, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._after_attention, with_kwargs=True))
            ACTIVE.activate(self, self.model, self._modules)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        """Put the model back exactly as it was found."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        while self._undo:
            self._undo.pop()()
        ACTIVE.deactivate(self, self.model, self._modules)
        if self._original_implementation is not None and self._adapter is not None:
            self._adapter.set_attention_implementation(self.model, self._original_implementation)
            self._original_implementation = None
        self._call = None
        self._cache = None
        self._pending.clear()
        self._chunker = None
        self._deferred.clear()

    # -- hooks ----------------------------------------------------------------------------

    def _before_model(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        assert self._adapter is not None
        self._pending.clear()  # plans of a call that raised must never reach the next one
        self._deferred.clear()
        self._masks.clear()
        tokens, inputs = call_tokens(args, kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the old name: remote-code models
        state = state_of(cache)
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if state is None and past == 0:
            if self.compressor.is_noop:  # exactly transformers' behaviour, whatever the inputs
                self._call = None
                self.report = _uncompressed_report(tokens, kwargs.get("attention_mask"))
                return
            if cache is not None:  # before input checks that a static cache's 4-D mask would trip
                check_cache_layers(cache, **self._cache_requirements())
            validate = not self._drafting.active  # an assistant's placeholders come without images
            budgets = self.compressor.budgets
            self._call = prefill_call(self._adapter, self.model, inputs, tokens, budgets, validate=validate)
            assert self._call.modality is not None
            lengths = (self._call.modality != Modality.PADDING).sum(-1).tolist()
            self.report = CompressionReport(prompt_lengths=tuple(int(n) for n in lengths), n_keep=self._call.n_keep)
            if self._chunker is not None:
                self._chunker.arm(self._call, self.report)
            return
        if self._chunker is not None:
            self._chunker.arm(None)
        if state is None:  # a cache filled without compression: plain transformers behaviour
            self._call = CallInfo(
                False, int(tokens.shape[1]), torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            )
            return
        if self.compressor.evicts_while_decoding:  # the strategy that compressed the cache may not have evicted
            check_decode_eviction(cache, type(self.compressor).__name__, self.compressor.decode_eviction_remedy)
        self._call = continuation_call(self._adapter, self.model, inputs, tokens, state)

    def _before_attention(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._cache = kwargs.get("cache", kwargs.get("past_key_values"))
        # a ragged layer accepts new entries only while a session that can read it is active
        claim_ragged_layer(self._cache, module, self)

    def _after_attention(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        layer_idx = int(module.layer_idx)  # type: ignore[arg-type]
        if self._chunker is not None and self._chunker.current is not None and self._call is not None:
            self._chunker.after_attention(layer_idx, self._cache, self._call)
            return
        pending = self._pending.pop(layer_idx, None)
        if pending is not None:
            self._apply(layer_idx, *pending)
        if self._deferred and layer_idx == self._last_layer:
            # the end of the prefill: every layer's attention has used its full cache
            self._apply_deferred()

    def _apply(
        self,
        layer_idx: int,
        plan: CompressionPlan | None,
        layer_state: LayerState,
        prefill: bool,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> None:
        """Apply a layer's plan to the current cache and record the layer's state (and the report at prefill).

        ``keys`` / ``values`` are the entries the plan indexes (the attention call's, in full
        precision: a quantized layer holds them quantized); default: the layer's own.
        """
        state = state_of(self._cache)
        if state is None:
            return
        layer = self._cache.layers[layer_idx]
        before = kv_bytes(layer) if prefill else 0
        if prefill:
            held = sum(kv_bytes(each) for each in self._cache.layers)
            self.report.kv_bytes_peak = max(self.report.kv_bytes_peak, held)
        if plan is not None:
            apply_plan(layer, plan, keys, values)
            prompt = self._call.modality if prefill and self._call is not None else None
            follow_plan(layer_state, plan, prompt)
            layer_state.set_slots(plan.slot_valid)
            if prefill and self._growing_cache:
                grow_in_place(layer)
        state.layers[layer_idx] = layer_state
        if prefill:
            self.report.layers_compressed += 1
            self.report.kv_bytes_before += before
            self.report.kv_bytes_after += kv_bytes(layer)

    def _apply_deferred(self) -> None:
        """Plan every layer observed during this prefill (all checked first), then compress them all."""
        assert self._call is not None
        views, self._deferred = self._deferred, []
        planned = plan_deferred_layers(self.compressor, self._call, views)
        for view, (plan, layer_state) in zip(views, planned, strict=True):
            self._apply(view.layer_idx, plan, layer_state, True, view.keys, view.values)

    # -- the attention wrapper ------------------------------------------------------------

    def attend(self, attention: AttentionCall) -> tuple[torch.Tensor, Any]:
        """Attention for one layer: the original at prefill (then plan), our own mask afterwards."""
        call, cache = self._call, self._cache
        if call is None or cache is None or (call.prefill and self.compressor.is_noop):
            return attention.run_original(attention.attention_mask)
        if self._chunker is not None and self._chunker.current is not None:
            return self._chunker.attend(attention, cache)
        if call.prefill:
            fused = None
            if self.fused_prefill:
                fused = fused_prefill_attention(self.compressor, call, cache, attention, self._masks)
            if fused is None:
                output = attention.run_original(attention.attention_mask)
                self._plan_prefill(attention, cache)
                return output
            output, sums = fused
            self._plan_prefill(attention, cache, accumulated=sums)
            return output
        state = state_of(cache)
        layer_state = state.layers.get(attention.layer_idx) if state is not None else None
        if layer_state is None:
            return attention.run_original(attention.attention_mask)
        decodes = self.compressor.acts_while_decoding
        ragged = ragged_layer(cache, attention.layer_idx)
        if ragged is not None:  # KV heads of different lengths: attention head by head
            return attend_ragged(call, layer_state, attention, ragged, decodes)
        output, plan = attend_compressed(self.compressor, call, layer_state, attention, decodes)
        if plan is None:  # nothing to apply: hold no reference to the step's keys and values
            self._pending[attention.layer_idx] = (None, layer_state, False, None, None)
        else:
            self._pending[attention.layer_idx] = (plan, layer_state, False, attention.key, attention.value)
        return output

    def _cache_requirements(self) -> dict[str, Any]:
        """What :func:`~kvpress_mm.cache.surgery.check_cache_layers` needs to know of the strategy."""
        return {
            "evicts_while_decoding": bool(self.compressor.evicts_while_decoding),
            "ragged_heads": bool(self.compressor.plans_ragged_heads) and not self.compressor.is_noop,
            "strategy": type(self.compressor).__name__,
            "remedy": self.compressor.decode_eviction_remedy,
        }

    def _install_chunked_prefill(self, adapter: ModelAdapter) -> None:
        """Split each prefill into chunks when the strategy asks for it (``prefill_chunk_size``)."""
        chunk_size = self.compressor.prefill_chunk_size
        if chunk_size is None:
            return
        self._chunker = ChunkedPrefill(self.compressor, int(chunk_size), self._growing_cache, self._num_layers)
        self._undo.append(self._chunker.install(adapter, self.model))

    def _plan_prefill(self, attention: AttentionCall, cache: Any, accumulated: torch.Tensor | None = None) -> None:
        assert self._call is not None
        layer_idx = attention.layer_idx
        if sliding_window_call(attention, cache):
            self.report.layers_skipped += 1
            if not self._warned_sliding:
                warnings.warn(SLIDING_LAYERS_LEFT, stacklevel=2)
                self._warned_sliding = True
            return
        view = prefill_view(self.compressor, self._call, cache, attention, self._num_layers, accumulated)
        if self.compressor.defers_plans:
            self.compressor.observe(view)
            view.drop_queries()  # kept until the end of the prefill: the queries are not needed any more
            self._deferred.append(view)
            return
        plan, layer_state = plan_layer(self.compressor, self._call, view)
        self._pending[layer_idx] = (plan, layer_state, True, attention.key, attention.value)


def _uncompressed_report(tokens: torch.Tensor, mask: Any) -> CompressionReport:
    """The report of a prefill a no-op strategy leaves alone: every real token kept."""
    rows, q_len = int(tokens.shape[0]), int(tokens.shape[1])
    lengths = mask.sum(-1).tolist() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else [q_len] * rows
    kept = tuple(int(n) for n in lengths)
    return CompressionReport(prompt_lengths=kept, n_keep=kept)
