"""The compressor session: hooks in on enter, out on exit; applies plans; owns decode masks.

How it works. On enter, the text decoder's attention implementation (``sdpa`` or ``eager``)
is replaced by a registered wrapper (``kvpress_mm_sdpa`` / ``kvpress_mm_eager``) that calls
the original, and three kinds of hooks are installed:

- a forward pre-hook on the model records each call's inputs (the modality map at prefill,
  which new tokens are real) and checks that a call on a compressed cache is well-formed;
- a forward pre-hook on each attention module records the cache object in use;
- a forward hook on each attention module applies the layer's pending plan to the cache,
  right after the layer's attention has used the full prompt.

The wrapper receives post-RoPE queries and the full keys of every model family, so strategies
never re-implement RoPE. For strategies that declare ``needs_accumulated_attention`` (``h2o``,
LOOK-M) the wrapper computes the prefill attention itself where that is exactly the model's
function (:func:`_fusable`, :func:`_mask_is_causal_with_padding`):
:func:`~kvpress_mm.scoring.attention_with_column_sums` yields the output and the all-query
column sums from one softmax, and the sums seed the layer's view (no second pass).

After compression the wrapper owns the attention mask of compressed layers: their cache
columns no longer line up with the 2-D ``attention_mask`` generate keeps, so the mask is
rebuilt from the kept slots' validity. Positions are untouched: generate derives them
from the full 2-D mask, so decoding continues at the original absolute positions.

What the session keeps per row of a compressed cache (slot validity, budgets, strategy state,
next positions, the adapter's prompt record) lives in a :class:`CacheState` tied to the cache
object. Beam search reorders the cache's rows between steps (``cache.reorder_cache``); the
cache instance's row methods are wrapped (:class:`_FollowRows`) so that this state follows.
Chunked prefill (``generate(prefill_chunk_size=...)``) would look like a short prompt and its
continuations, so the model's ``_prefill`` is wrapped for the session's lifetime to refuse it.
"""

from __future__ import annotations

import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kvpress_mm.adapters.base import ModelAdapter, find_adapter
from kvpress_mm.budget import n_keep_for
from kvpress_mm.cache_surgery import apply_plan, kv_bytes
from kvpress_mm.errors import (
    CompressorAlreadyActiveError,
    InvalidInputError,
    InvalidPlanError,
    UnsupportedCacheError,
    UnsupportedModelError,
)
from kvpress_mm.layer import DecodeView, LayerView
from kvpress_mm.modality import Modality
from kvpress_mm.plan import CompressionPlan
from kvpress_mm.scoring import attention_with_column_sums

if TYPE_CHECKING:
    from kvpress_mm.compressor import Compressor

ATTENTION_PREFIX = "kvpress_mm_"
#: Free entries a compressed layer's GrowingLayer starts with (then it doubles when full).
GROWING_HEADROOM = 128
WRAPPABLE_IMPLEMENTATIONS = ("sdpa", "eager")

AttentionFunction = Callable[..., tuple[torch.Tensor, Any]]

#: Compute the prefill attention of strategies that need the all-query column sums with our
#: chunked attention (output and sums from one softmax). Private switch: tests turn it off to
#: compare with the lazy path (the model's attention, then a second pass for the sums).
_FUSED_PREFILL = True
#: Keyword arguments of the attention call that change its math when set (not None / not False):
#: with any of them, the model's own attention runs and the sums are computed lazily.
_MATH_CHANGING_KWARGS = (
    "softcap",
    "logit_softcapping",
    "s_aux",
    "sinks",
    "position_bias",
    "sliding_window",
    "attention_chunk_size",
    "head_mask",
    "output_attentions",
)

_session_by_module: weakref.WeakKeyDictionary[nn.Module, CompressionSession] = weakref.WeakKeyDictionary()
_session_by_model: weakref.WeakKeyDictionary[nn.Module, CompressionSession] = weakref.WeakKeyDictionary()
_cache_states: weakref.WeakKeyDictionary[Any, CacheState] = weakref.WeakKeyDictionary()


@dataclass
class LayerState:
    """What the session keeps about one compressed layer of one cache."""

    length: int  # entries the layer holds
    slot_valid: torch.Tensor | None  # [B, length] bool, False for filler slots; None = all valid
    n_keep: tuple[int, ...]
    strategy_state: dict[str, Any]

    def set_slots(self, slot_valid: torch.Tensor) -> None:
        """Record the layer's slots after a change (``None`` when all are valid: the fast path)."""
        self.length = int(slot_valid.shape[-1])
        self.slot_valid = None if bool(slot_valid.all()) else slot_valid

    def select_rows(self, rows: torch.Tensor, batch: int) -> None:
        """Keep rows ``rows`` of ``batch`` (in that order), as the cache just did."""
        if self.slot_valid is not None:
            self.slot_valid = self.slot_valid.index_select(0, rows.to(self.slot_valid.device))
        self.n_keep = tuple(self.n_keep[i] for i in rows.tolist())
        selected = _select_rows(self.strategy_state, rows, batch)
        self.strategy_state.clear()  # in place: the dict is the strategy's, views share it
        self.strategy_state.update(selected)


@dataclass
class CacheState:
    """What the session keeps about a cache it compressed (lives as long as the cache)."""

    seen_columns: int  # columns of the 2-D attention mask consumed so far (prompt + decoded)
    layers: dict[int, LayerState] = field(default_factory=dict)
    # [B] long: each row's real tokens so far, i.e. the position its next token must have
    next_positions: torch.Tensor | None = None
    # what the adapter recorded about the prompt (ModelAdapter.record_prompt)
    prompt_record: dict[str, Any] = field(default_factory=dict)

    def rows_for(self, method: str, argument: Any) -> tuple[torch.Tensor, int] | None:
        """The rows (of the batch size before the call) the cache keeps after ``cache.<method>(argument)``."""
        if self.next_positions is None:
            return None
        batch = int(self.next_positions.shape[0])
        if method == "batch_repeat_interleave":
            return torch.arange(batch).repeat_interleave(int(argument)), batch
        rows = torch.as_tensor(argument)
        if rows.dtype == torch.bool:
            rows = rows.nonzero().flatten()
        rows = rows.long().flatten().cpu()
        return torch.where(rows < 0, rows + batch, rows), batch

    def select_rows(self, rows: torch.Tensor, batch: int) -> None:
        """Keep rows ``rows`` of every per-row tensor, as the cache just did (beam search's reordering)."""
        if self.next_positions is not None:
            self.next_positions = self.next_positions.index_select(0, rows.to(self.next_positions.device))
        self.prompt_record = _select_rows(self.prompt_record, rows, batch)
        for layer_state in self.layers.values():
            layer_state.select_rows(rows, batch)


def _select_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` with only rows ``rows`` (in that order) of its per-row parts.

    Per-row parts are tensors whose first dimension is the batch (``batch`` long), and lists
    and tuples of ``batch`` items; dicts are searched recursively. Anything else is shared by
    all rows and returned as it is. This is the convention for what a strategy keeps in
    ``LayerView.state`` and an adapter returns from ``ModelAdapter.record_prompt``.

    >>> _select_rows({"scores": torch.tensor([1.0, 2.0]), "windows": [3, 4], "k": 5}, torch.tensor([1, 1]), 2)
    {'scores': tensor([2., 2.]), 'windows': [4, 4], 'k': 5}
    """
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, dict):
        return {key: _select_rows(item, rows, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == batch:
        picked = [value[i] for i in rows.tolist()]
        return picked if isinstance(value, list) else tuple(picked)
    return value


#: The cache methods that change which rows a cache holds (beam search calls ``reorder_cache``).
_ROW_METHODS = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave")
_changing_rows: set[int] = set()  # ids of caches inside one of their _ROW_METHODS


class _FollowRows:
    """Stands in for one of a compressed cache's :data:`_ROW_METHODS` (on that cache instance only).

    Calls the cache's own method, then selects the same rows of everything the session keeps
    about the cache (slot masks, strategy state such as ``h2o``'s scores, next positions, the
    adapter's prompt record), so that per-row state stays with its row when beam search
    reorders the beams. The cache's class and the model are left untouched.
    """

    def __init__(
        self,
        cache: Any,
        name: str,
        previous: Callable[..., Any] | None = None,
        state: CacheState | None = None,
    ) -> None:
        self._cache = weakref.ref(cache)  # the cache holds this object: no reference cycle
        self._name = name
        self._previous = previous  # an instance attribute that was there before, if any
        if state is not None and cache not in _cache_states:
            # a copy of a compressed cache (copy.deepcopy, pickle) continues as compressed:
            # without its state it would decode as an uncompressed cache, silently wrong
            _cache_states[cache] = state

    def __call__(self, argument: Any) -> Any:
        cache = self._cache()
        if cache is None:  # pragma: no cover - the cache owns this object
            raise ReferenceError("the cache this method belongs to no longer exists")
        state = _cache_states.get(cache)
        nested = id(cache) in _changing_rows  # one row method calling another: follow once
        rows = None if state is None or nested else state.rows_for(self._name, argument)
        _changing_rows.add(id(cache))
        try:
            if self._previous is not None:
                result = self._previous(argument)
            else:
                result = getattr(type(cache), self._name)(cache, argument)
        finally:
            if not nested:
                _changing_rows.discard(id(cache))
        if state is not None and rows is not None:
            state.select_rows(*rows)
        return result

    def __reduce__(self) -> tuple[Any, ...]:
        # a copy of the cache (copy.deepcopy, pickle) gets a stand-in bound to the copy, and a
        # copy of the session's state for it (deepcopy's memo shares one copy between stand-ins)
        cache = self._cache()
        return (_FollowRows, (cache, self._name, self._previous, _cache_states.get(cache)))


def _follow_row_changes(cache: Any) -> None:
    """Install :class:`_FollowRows` for each of ``cache``'s :data:`_ROW_METHODS` (once)."""
    for name in _ROW_METHODS:
        if not callable(getattr(type(cache), name, None)):
            continue
        previous = vars(cache).get(name)
        if isinstance(previous, _FollowRows):
            continue
        setattr(cache, name, _FollowRows(cache, name, previous))


def _refuse_chunked_prefill(model: nn.Module) -> Callable[[], None] | None:
    """Make ``generate(prefill_chunk_size=...)`` raise before its first chunk reaches the model.

    transformers' chunked prefill feeds the prompt to the model in pieces; each piece looks
    like a call that continues a cache, so compression would keep ``int(chunk * (1 - r))``
    entries of the first piece and append the others in full. Returns the undo function.
    """
    original = getattr(model, "_prefill", None)
    if not callable(original):
        return None
    own = vars(model).get("_prefill")
    parameters = list(inspect.signature(original).parameters)

    def _prefill(*args: Any, **kwargs: Any) -> Any:
        config = {**dict(zip(parameters, args)), **kwargs}.get("generation_config")
        chunk = getattr(config, "prefill_chunk_size", None)
        if chunk is not None:
            raise InvalidInputError(
                f"chunked prefill is not supported under compression: drop prefill_chunk_size (it is {chunk}; "
                "pass prefill_chunk_size=None to generate, or unset it in the generation config). Compression "
                "needs the whole prompt in one prefill call"
            )
        return original(*args, **kwargs)

    object.__setattr__(model, "_prefill", _prefill)

    def undo() -> None:
        if vars(model).get("_prefill") is _prefill:
            if own is None:
                object.__delattr__(model, "_prefill")
            else:
                object.__setattr__(model, "_prefill", own)

    return undo


@dataclass
class CallInfo:
    """One model call, as seen by the model pre-hook."""

    prefill: bool
    q_len: int
    new_valid: torch.Tensor  # [B, q] bool: which new tokens are real
    modality: torch.Tensor | None = None  # [B, P] int8 at prefill
    n_keep: tuple[int, ...] = ()
    prompt_record: dict[str, Any] = field(default_factory=dict)  # ModelAdapter.record_prompt at prefill

    @property
    def new_all_valid(self) -> bool:
        """True when every new token is real (computed once per call)."""
        if not hasattr(self, "_new_all_valid"):
            self._new_all_valid = bool(self.new_valid.all())
        return self._new_all_valid


@dataclass
class CompressionReport:
    """What the last prefill compression did (summed over layers).

    A new report replaces the previous one at every prefill (a model call on an empty cache)
    made inside the session; calls that continue a cache leave it as it is.

    Attributes:
        layers_compressed: decoder layers whose cache was compressed.
        layers_skipped: decoder layers left uncompressed (sliding-window layers).
        kv_bytes_before: bytes of the compressed layers' keys and values right after the
            prefill, before compression.
        kv_bytes_after: the same layers' bytes right after compression.
        prompt_lengths: real (non-padding) prompt tokens of each row of the batch.
        n_keep: cache entries each row keeps per layer and KV head (its budget).

    """

    layers_compressed: int = 0
    layers_skipped: int = 0
    kv_bytes_before: int = 0
    kv_bytes_after: int = 0
    prompt_lengths: tuple[int, ...] = ()
    n_keep: tuple[int, ...] = ()

    @property
    def ratio_kept(self) -> float:
        """``kv_bytes_after / kv_bytes_before`` (1.0 before any compression)."""
        return self.kv_bytes_after / self.kv_bytes_before if self.kv_bytes_before else 1.0


def _base_decode_plan() -> Any:
    from kvpress_mm.compressor import Compressor

    return Compressor.decode_plan


def _original_attention(module: nn.Module, wrapped: str) -> AttentionFunction:
    """The implementation our wrapper stands in for."""
    if wrapped == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no eager_attention_forward in its modeling file; use sdpa attention"
        )
    return eager


def _make_attention_function(wrapped: str) -> AttentionFunction:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        original = _original_attention(module, wrapped)
        session = _session_by_module.get(module)
        if session is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        return session._attend(module, query, key, value, attention_mask, original, wrapped, **kwargs)

    attention.__name__ = f"{ATTENTION_PREFIX}{wrapped}_attention"
    return attention


_registered = False


def _register_attention_functions() -> None:
    """Register the wrappers with transformers' attention and mask interfaces (once)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for wrapped, mask_function in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        AttentionInterface.register(ATTENTION_PREFIX + wrapped, _make_attention_function(wrapped))
        # without a mask function of the same name, transformers would build no mask at all
        AttentionMaskInterface.register(ATTENTION_PREFIX + wrapped, mask_function)
    _registered = True


def _first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any], name: str) -> torch.Tensor | None:
    value = kwargs.get(name)
    if value is None and name == "input_ids" and args and isinstance(args[0], torch.Tensor):
        value = args[0]
    return value if isinstance(value, torch.Tensor) else None


def _check_left_padding(modality: torch.Tensor) -> None:
    real = modality != Modality.PADDING
    if not bool(real.any(-1).all()):
        raise InvalidInputError("a row of the batch is all padding; remove it or give it at least one token")
    # once a row has a real token, it must not have padding after it
    seen_real = real.long().cumsum(-1) > 0
    if bool((seen_real & ~real).any()):
        raise InvalidInputError(
            "padding after real tokens (right or middle padding) is not supported under compression: "
            "pad on the left (tokenizer.padding_side = 'left'), as generate expects"
        )


def _unsupported_cache_layer(layer: Any, layer_idx: int) -> UnsupportedCacheError:
    return UnsupportedCacheError(
        f"cannot compress a {type(layer).__name__} cache layer (layer {layer_idx}); compression needs "
        "transformers' DynamicCache: do not set cache_implementation='static' (or quantized/offloaded), "
        "or pass past_key_values=DynamicCache(config=model.config)"
    )


def _compressible(layer: Any) -> bool:
    """A plain ``DynamicLayer``, or kvpress-mm's :class:`~kvpress_mm.growing_cache.GrowingLayer`."""
    from transformers.cache_utils import DynamicLayer

    from kvpress_mm.growing_cache import GrowingLayer

    return type(layer) is DynamicLayer or type(layer) is GrowingLayer


def _fusable(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    modality: torch.Tensor,
    wrapped: str,
    kwargs: Mapping[str, Any],
) -> bool:
    """True when :func:`~kvpress_mm.scoring.attention_with_column_sums` computes what the original would.

    That is plain scaled causal softmax attention over the whole prompt: inference (no
    dropout, no gradient), an explicit ``scaling``, none of :data:`_MATH_CHANGING_KWARGS`,
    no attention weights asked for, shapes of a prefill on an empty cache, and for ``eager``
    the standard ``eager_attention_forward`` (the mask is checked separately).
    """
    if module.training or float(kwargs.get("dropout") or 0.0) != 0.0:
        return False
    if kwargs.get("scaling") is None:
        return False
    for name in _MATH_CHANGING_KWARGS:
        setting = kwargs.get(name)
        if setting is not None and setting is not False:
            return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or not query.is_floating_point():
        return False
    b, hq, p, d = query.shape
    kvh = int(key.shape[1])
    if tuple(key.shape) != (b, kvh, p, d) or tuple(value.shape[:3]) != (b, kvh, p) or kvh == 0 or hq % kvh:
        return False
    if tuple(modality.shape) != (b, p):
        return False
    if wrapped == "eager":
        return _is_standard_eager(module) and not _attention_weights_requested(module)
    return True


def _is_standard_eager(module: nn.Module) -> bool:
    """The module's ``eager_attention_forward`` is transformers' plain one (Llama's, copied by most families)."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        return False
    from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

    if eager is llama_eager:
        return True
    mine, standard = getattr(eager, "__code__", None), llama_eager.__code__
    return mine is not None and all(
        getattr(mine, attr) == getattr(standard, attr)
        for attr in ("co_code", "co_consts", "co_names", "co_varnames", "co_argcount", "co_kwonlyargcount")
    )


def _attention_weights_requested(module: nn.Module) -> bool:
    """True when the model call records attention weights (``output_attentions``): eager must return them."""
    if getattr(getattr(module, "config", None), "output_attentions", False):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - another transformers layout: assume they may be
        return True
    try:
        collected = _active_collector.get()
    except LookupError:
        return False
    # "attentions" for self-attention; any other attention output a model may record, to be safe
    return isinstance(collected, Mapping) and any("attention" in str(name) for name in collected)


def _mask_is_causal_with_padding(mask: torch.Tensor, key_valid: torch.Tensor, wrapped: str) -> bool:
    """``mask`` (``[B or 1, 1, P, P]``) is exactly causal and hides exactly the padding keys.

    sdpa masks are bool (True = visible); eager masks are additive, 0 where visible and the
    dtype's minimum elsewhere, as transformers' ``eager_mask`` builds them.
    """
    b, p = key_valid.shape
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, b) or tuple(mask.shape[-2:]) != (p, p):
        return False
    if wrapped == "sdpa":
        if mask.dtype != torch.bool:
            return False
        blocked = None
    else:
        if not mask.is_floating_point():
            return False
        blocked = torch.finfo(mask.dtype).min
    key_valid = key_valid.to(mask.device)
    columns = torch.arange(p, device=mask.device)
    step = max(1, 2**22 // (b * p))  # rows per block: a few MiB of temporaries
    for start in range(0, p, step):
        end = min(p, start + step)
        visible = (columns[None, :] <= columns[start:end, None])[None] & key_valid[:, None, :]  # [B, rows, P]
        block = mask[:, 0, start:end].expand(b, -1, -1)
        if blocked is None:
            same = bool(torch.equal(block, visible))
        else:
            same = bool(torch.where(visible, block == 0, block == blocked).all())
        if not same:
            return False
    return True


def _grow_in_place(layer: Any) -> None:
    """Make a compressed layer a GrowingLayer (the same object), so that decode steps append without copying."""
    from kvpress_mm.growing_cache import GrowingLayer

    if type(layer) is not GrowingLayer:
        GrowingLayer.adopt(layer, headroom=GROWING_HEADROOM, exact=True)


def _check_cache_layers(cache: Any) -> None:
    """Refuse, up front, a cache whose (non-sliding) layers are not plain ``DynamicLayer``s (or growing ones)."""
    for layer_idx, layer in enumerate(getattr(cache, "layers", None) or ()):
        if not getattr(layer, "is_sliding", False) and not _compressible(layer):
            raise _unsupported_cache_layer(layer, layer_idx)


def _check_continuation_positions(state: CacheState, position_ids: torch.Tensor, q_len: int) -> None:
    """Refuse a call on a compressed cache whose first new token is not where the conversation stands.

    Catches ``generate(full_history, cache=compressed)``: generate slices the history at the
    (shorter) cache length and re-feeds tokens the cache has already seen.
    """
    expected = state.next_positions
    text = position_ids[0] if position_ids.dim() == 3 and position_ids.shape[0] == 4 else position_ids
    if expected is None or text.dim() != 2 or text.shape[-1] != q_len or text.shape[0] not in (1, expected.shape[0]):
        return  # multimodal RoPE positions, or shapes we cannot compare
    first = text[:, 0].to(expected.device).expand_as(expected)
    # positions counted over real tokens (generate), or over mask columns (a plain forward without a mask)
    if bool(((first == expected) | (first == state.seen_columns)).all()):
        return
    raise InvalidInputError(
        f"this compressed cache continues at position(s) {expected.tolist()}, but the call's first new token "
        f"is at {first.tolist()}. To continue on a compressed cache, pass only the tokens it has not seen as "
        "input_ids, with the attention_mask of the whole conversation"
    )


class CompressionSession:
    """A model under compression: a context manager returned by ``compressor(model)``.

    ```python
    with compressor(model) as session:
        out = model.generate(**inputs, max_new_tokens=32)
    print(session.report.kv_bytes_before, session.report.kv_bytes_after)
    ```

    With ``growing_cache`` (the default), each layer compressed at prefill is moved into a
    :class:`~kvpress_mm.growing_cache.GrowingLayer` whose storage is exactly the kept entries; the
    first decode step reallocates once with a little headroom, and later steps append in place
    instead of copying the whole cache (``DynamicLayer``'s ``torch.cat``); ``False`` keeps
    transformers' ``DynamicLayer``. Outputs are identical.
    """

    def __init__(self, compressor: Compressor, model: nn.Module, *, growing_cache: bool = True) -> None:
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
        self._pending: dict[int, tuple[CompressionPlan | None, LayerState, bool]] = {}
        self._warned_sliding = False
        # attention masks of the current call already checked by _plain_causal_mask, with the verdict
        self._checked_masks: list[tuple[weakref.ref[torch.Tensor], bool]] = []
        # compressed layers move into a GrowingLayer: decode steps append in place (no torch.cat copy)
        self._growing_cache = growing_cache
        # only strategies that act while decoding pay for the decode-time view
        self._decodes = type(compressor).decode_plan is not _base_decode_plan()

    # -- entering and leaving -------------------------------------------------------------

    def __enter__(self) -> CompressionSession:
        if self.model in _session_by_model:
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
            _register_attention_functions()
            adapter.set_attention_implementation(self.model, ATTENTION_PREFIX + original)
            self._original_implementation = original
            self._handles.append(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
            if not self.compressor.is_noop:
                for instrument in (adapter.instrument, _refuse_chunked_prefill):
                    undo = instrument(self.model)
                    if undo is not None:
                        self._undo.append(undo)
            for module in self._modules:
                _session_by_module[module] = self
                self._handles.append(module.register_forward_pre_hook(self._before_attention, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._after_attention, with_kwargs=True))
            _session_by_model[self.model] = self
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
        for module in self._modules:
            if _session_by_module.get(module) is self:
                del _session_by_module[module]
        if self._original_implementation is not None and self._adapter is not None:
            self._adapter.set_attention_implementation(self.model, self._original_implementation)
            self._original_implementation = None
        if _session_by_model.get(self.model) is self:
            del _session_by_model[self.model]
        self._call = None
        self._cache = None
        self._pending.clear()

    # -- hooks ----------------------------------------------------------------------------

    def _before_model(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        assert self._adapter is not None
        self._pending.clear()  # plans of a call that raised must never reach the next one
        self._checked_masks.clear()
        tokens = _first_tensor(args, kwargs, "input_ids")
        if tokens is None:
            tokens = _first_tensor(args, kwargs, "inputs_embeds")
        if tokens is None:
            raise InvalidInputError("the model call has neither input_ids nor inputs_embeds")
        q_len = int(tokens.shape[1])
        if q_len == 0:
            raise InvalidInputError("empty prompt: the model call has 0 tokens")
        inputs = dict(kwargs)
        if "input_ids" not in inputs and args and isinstance(args[0], torch.Tensor):
            inputs["input_ids"] = args[0]
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        state = _cache_states.get(cache) if cache is not None else None
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        mask = kwargs.get("attention_mask")
        if state is None and past == 0:
            if self.compressor.is_noop:  # exactly transformers' behaviour, whatever the inputs
                self._call = None
                rows = int(tokens.shape[0])
                lengths = (
                    mask.sum(-1).tolist() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else [q_len] * rows
                )
                kept = tuple(int(n) for n in lengths)
                self.report = CompressionReport(prompt_lengths=kept, n_keep=kept)
                return
            if cache is not None:
                _check_cache_layers(cache)  # before input checks that a static cache's 4-D mask would trip
            self._adapter.validate_inputs(self.model, inputs)
            modality = self._adapter.modality_map(self.model, inputs, q_len).to(tokens.device)
            _check_left_padding(modality)
            lengths = (modality != Modality.PADDING).sum(-1).tolist()
            n_keep = tuple(n_keep_for(int(n), self.compressor.compression_ratio) for n in lengths)
            record = self._adapter.record_prompt(self.model, inputs)
            self._call = CallInfo(True, q_len, modality != Modality.PADDING, modality, n_keep, record)
            self.report = CompressionReport(prompt_lengths=tuple(int(n) for n in lengths), n_keep=n_keep)
            return
        if state is None:  # a cache filled without compression: plain transformers behaviour
            self._call = CallInfo(False, q_len, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
            return
        if isinstance(mask, torch.Tensor):
            if mask.dim() != 2:
                raise InvalidInputError("custom 4-D attention masks are not supported on a compressed cache")
            if mask.shape[1] != state.seen_columns + q_len:
                raise InvalidInputError(
                    f"this compressed cache has seen {state.seen_columns} positions (it holds fewer entries), "
                    f"but the call brings {q_len} tokens with an attention_mask of {mask.shape[1]} columns. "
                    "To continue on a compressed cache, pass only the tokens it has not seen as input_ids, "
                    "with the attention_mask of the whole conversation"
                )
            new_valid = mask[:, -q_len:].to(device=tokens.device, dtype=torch.bool)
        else:
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                raise InvalidInputError(
                    "a call on a compressed cache needs the 2-D attention_mask of the whole conversation or "
                    "explicit position_ids: positions derived from the (shorter) cache length would be wrong"
                )
            new_valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if state.next_positions is not None:
            record, positions = state.prompt_record, state.next_positions
            self._adapter.validate_continuation(self.model, inputs, record, positions, new_valid)
        if not isinstance(mask, torch.Tensor):
            # generate drops an all-ones attention_mask and passes position_ids instead
            _check_continuation_positions(state, kwargs["position_ids"], q_len)
        state.seen_columns += q_len
        if state.next_positions is not None:
            state.next_positions = state.next_positions + new_valid.sum(-1).to(state.next_positions.device)
        self._call = CallInfo(False, q_len, new_valid)

    def _before_attention(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._cache = kwargs.get("cache", kwargs.get("past_key_values"))

    def _after_attention(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        pending = self._pending.pop(int(module.layer_idx), None)  # type: ignore[arg-type]
        if pending is None or self._cache is None:
            return
        plan, layer_state, prefill = pending
        layer = self._cache.layers[int(module.layer_idx)]  # type: ignore[arg-type]
        before = kv_bytes(layer)
        if plan is not None:
            apply_plan(layer, plan)
            layer_state.set_slots(plan.slot_valid)
            if prefill and self._growing_cache:
                _grow_in_place(layer)
        state = _cache_states[self._cache]
        state.layers[int(module.layer_idx)] = layer_state  # type: ignore[arg-type]
        if prefill:
            self.report.layers_compressed += 1
            self.report.kv_bytes_before += before
            self.report.kv_bytes_after += kv_bytes(layer)

    # -- the attention wrapper ------------------------------------------------------------

    def _attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        original: AttentionFunction,
        wrapped: str,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        """Attention for one layer: the original at prefill (then plan), our own mask afterwards."""
        call, cache = self._call, self._cache
        if call is None or cache is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        layer_idx = int(module.layer_idx)  # type: ignore[arg-type]
        if call.prefill:
            if self.compressor.is_noop:
                return original(module, query, key, value, attention_mask, **kwargs)
            fused = self._fused_prefill(module, layer_idx, cache, query, key, value, attention_mask, wrapped, kwargs)
            if fused is None:
                output = original(module, query, key, value, attention_mask, **kwargs)
                self._plan_prefill(module, layer_idx, cache, query, key, value, kwargs)
                return output
            output, sums = fused
            self._plan_prefill(module, layer_idx, cache, query, key, value, kwargs, accumulated=sums)
            return output
        state = _cache_states.get(cache)
        layer_state = state.layers.get(layer_idx) if state is not None else None
        if layer_state is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        return self._attend_compressed(module, layer_idx, layer_state, query, key, value, original, wrapped, kwargs)

    def _fused_prefill(
        self,
        module: nn.Module,
        layer_idx: int,
        cache: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        wrapped: str,
        kwargs: dict[str, Any],
    ) -> tuple[tuple[torch.Tensor, Any], torch.Tensor] | None:
        """The layer's prefill attention and its column sums in one pass, or ``None`` to use the original.

        Taken when the strategy declares ``needs_accumulated_attention`` and our chunked
        attention computes exactly what the original would (see :func:`_fusable`); the sums
        then seed the layer's :class:`LayerView`, so they are not computed a second time.
        """
        call = self._call
        assert call is not None
        if not (_FUSED_PREFILL and getattr(type(self.compressor), "needs_accumulated_attention", False)):
            return None
        modality = call.modality
        layers = getattr(cache, "layers", None)
        if modality is None or layers is None or layer_idx >= len(layers):
            return None
        layer = layers[layer_idx]
        if getattr(layer, "is_sliding", False) or not _compressible(layer):
            return None  # _plan_prefill skips the layer or refuses the cache
        if not _fusable(module, query, key, value, modality, wrapped, kwargs):
            return None
        key_valid = (modality != Modality.PADDING).to(key.device)
        if not self._plain_causal_mask(module, attention_mask, key_valid, wrapped, kwargs):
            return None
        scaling = float(kwargs["scaling"])
        output, sums = attention_with_column_sums(query, key, value, scaling, key_valid, key_valid)
        # what transformers' sdpa_attention_forward / eager_attention_forward return (no weights asked for)
        return (output.transpose(1, 2).contiguous(), None), sums

    def _plain_causal_mask(
        self,
        module: nn.Module,
        attention_mask: torch.Tensor | None,
        key_valid: torch.Tensor,
        wrapped: str,
        kwargs: dict[str, Any],
    ) -> bool:
        """True when the original attention would mask exactly causal + the call's padding.

        A mask tensor is checked once per call (transformers passes the same one to every
        layer), row block by row block so that the check allocates no ``[B, P, P]`` temporary.
        """
        padded = not bool(key_valid.all())
        length = int(key_valid.shape[-1])
        if attention_mask is None:
            if wrapped == "eager":  # eager applies no causal mask of its own
                return length == 1 and not padded
            is_causal = kwargs.get("is_causal")
            is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
            # sdpa_attention_forward: is_causal=True when there is no mask (and more than one query)
            return not padded and (bool(is_causal) or length == 1)
        for checked, verdict in self._checked_masks:
            if checked() is attention_mask:
                return verdict
        verdict = _mask_is_causal_with_padding(attention_mask, key_valid, wrapped)
        self._checked_masks.append((weakref.ref(attention_mask), verdict))
        return verdict

    def _plan_prefill(
        self,
        module: nn.Module,
        layer_idx: int,
        cache: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kwargs: dict[str, Any],
        accumulated: torch.Tensor | None = None,
    ) -> None:
        call = self._call
        assert call is not None and call.modality is not None
        layer = cache.layers[layer_idx]
        if getattr(layer, "is_sliding", False) or kwargs.get("sliding_window") is not None:
            # sliding-window layers already hold at most their window; their cache and mask
            # logic keys on counts we would break, so they stay as transformers keeps them
            self.report.layers_skipped += 1
            if not self._warned_sliding:
                warnings.warn(
                    "kvpress-mm leaves sliding-window attention layers uncompressed (they already keep only "
                    "their window); full-attention layers are compressed",
                    stacklevel=2,
                )
                self._warned_sliding = True
            return
        if not _compressible(layer):
            raise _unsupported_cache_layer(layer, layer_idx)
        if key.shape[2] != call.modality.shape[1]:
            raise InvalidInputError(
                f"layer {layer_idx} saw {key.shape[2]} prompt keys but the call has {call.modality.shape[1]} "
                "positions; chunked prefill is not supported under compression"
            )
        if cache not in _cache_states:
            next_positions = (call.modality != Modality.PADDING).sum(-1)
            _cache_states[cache] = CacheState(
                seen_columns=call.q_len, next_positions=next_positions, prompt_record=call.prompt_record
            )
            _follow_row_changes(cache)  # beam search reorders the cache's rows between steps
        view = LayerView(
            layer_idx=layer_idx,
            keys=key,
            values=value,
            queries=query,
            scaling=float(kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)),
            modality=call.modality.to(key.device),  # layers may live on different devices
            n_keep=call.n_keep,
            accumulated_attention_per_head=accumulated,
        )
        plan = self.compressor.plan(view)
        self._check_plan(plan, view)
        layer_state = LayerState(plan.n_slots, None, call.n_keep, view.state)
        self._pending[layer_idx] = (plan, layer_state, True)

    def _check_plan(self, plan: CompressionPlan, view: LayerView) -> None:
        name = type(self.compressor).__name__
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

    def _attend_compressed(
        self,
        module: nn.Module,
        layer_idx: int,
        layer_state: LayerState,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        original: AttentionFunction,
        wrapped: str,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, Any]:
        call = self._call
        assert call is not None
        q_len = query.shape[2]
        cached = key.shape[2] - q_len
        if cached != layer_state.length:
            raise InvalidInputError(
                f"layer {layer_idx}'s compressed cache holds {cached} entries but kvpress-mm expected "
                f"{layer_state.length}: the cache was changed outside the compressor (crop, reorder, beam search?)"
            )
        visible: torch.Tensor | None = None
        mask: torch.Tensor | None = None
        if not (q_len == 1 and layer_state.slot_valid is None and call.new_all_valid):
            visible = self._visible(layer_state, call, cached, q_len, key.device)
            if wrapped == "sdpa":
                mask = visible[:, None]
            else:
                mask = torch.zeros(visible.shape, dtype=query.dtype, device=key.device)
                mask = mask.masked_fill(~visible, torch.finfo(query.dtype).min)[:, None]
        output = original(module, query, key, value, mask, **kwargs)
        if layer_state.slot_valid is None and call.new_all_valid:
            slot_valid = None
        else:
            slot_valid = torch.cat(
                [self._cached_valid(layer_state, call, key.device), call.new_valid.to(key.device)], dim=-1
            )
        plan = None
        if self._decodes:
            if visible is None:
                visible = self._visible(layer_state, call, cached, q_len, key.device)
            view = DecodeView(
                layer_idx=layer_idx,
                keys=key,
                values=value,
                queries=query,
                scaling=float(kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)),
                slot_valid=slot_valid if slot_valid is not None else visible[:, -1],
                visible=visible,
                n_keep=layer_state.n_keep,
                state=layer_state.strategy_state,
            )
            plan = self.compressor.decode_plan(view)
        layer_state.length = cached + q_len
        layer_state.slot_valid = slot_valid
        self._pending[layer_idx] = (plan, layer_state, False)
        return output

    @staticmethod
    def _cached_valid(layer_state: LayerState, call: CallInfo, device: torch.device) -> torch.Tensor:
        if layer_state.slot_valid is not None:
            return layer_state.slot_valid.to(device)
        return torch.ones(call.new_valid.shape[0], layer_state.length, dtype=torch.bool, device=device)

    def _visible(
        self, layer_state: LayerState, call: CallInfo, cached: int, q_len: int, device: torch.device
    ) -> torch.Tensor:
        """``[B, q, cached + q]`` bool: kept valid slots, then the new tokens causally."""
        cached_valid = self._cached_valid(layer_state, call, device)
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
        new_valid = call.new_valid.to(device)
        return torch.cat([cached_valid[:, None, :].expand(-1, q_len, -1), causal[None] & new_valid[:, None, :]], dim=-1)
