"""The attention wrapper: how the session sees every layer's post-RoPE queries and full keys.

On enter, the session switches the text decoder's attention implementation (``sdpa`` or
``eager``) to a wrapper registered with transformers' ``AttentionInterface``
(``kvpress_mm_sdpa`` / ``kvpress_mm_eager``). The wrapper finds the session that compresses the
module (:data:`ACTIVE`) and hands it the call; with no session it is exactly the original. It
receives post-RoPE queries and the full keys of every model family, so strategies never
re-implement RoPE, multimodal RoPE or ``q_norm``.

This module also decides when the session may compute a prefill attention itself (the fused
path of strategies that need all-query column sums): only where that is exactly the model's
function (:func:`fusable`, :func:`mask_is_causal_with_padding`).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from kvpress_mm.errors import UnsupportedModelError

#: Prefix of the attention implementations the session registers (``kvpress_mm_sdpa``, ``kvpress_mm_eager``).
ATTENTION_PREFIX = "kvpress_mm_"
#: The model attention implementations the wrapper can stand in for.
WRAPPABLE_IMPLEMENTATIONS = ("sdpa", "eager")

AttentionFunction = Callable[..., tuple[torch.Tensor, Any]]


@dataclass
class AttentionCall:
    """One layer's attention call, as the model made it, with the implementation it wraps."""

    module: nn.Module
    query: torch.Tensor  # [B, heads, q, head_dim], post-RoPE
    key: torch.Tensor  # [B, kv_heads, kv, head_dim]: the layer's cache with this call's entries last
    value: torch.Tensor  # [B, kv_heads, kv, head_dim]
    attention_mask: torch.Tensor | None  # what the model built (meaningless on a compressed layer)
    kwargs: dict[str, Any]  # scaling, dropout, sliding_window, ...
    original: AttentionFunction  # the model's own sdpa / eager function
    wrapped: str  # "sdpa" or "eager"

    @property
    def layer_idx(self) -> int:
        """The decoder layer's index."""
        return int(self.module.layer_idx)  # type: ignore[arg-type]

    @property
    def scaling(self) -> float:
        """The softmax scale of the call (the module's, else ``head_dim ** -0.5``)."""
        return float(self.kwargs.get("scaling") or getattr(self.module, "scaling", self.query.shape[-1] ** -0.5))

    def run_original(self, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """The model's own attention of this call, with ``attention_mask``."""
        return self.original(self.module, self.query, self.key, self.value, attention_mask, **self.kwargs)

    def mask_from_visible(self, visible: torch.Tensor) -> torch.Tensor:
        """``visible [B, q, kv]`` bool as the wrapped implementation's mask ``[B, 1, q, kv]``.

        sdpa takes the bool mask (True = attend); eager adds a float mask, 0 where visible and the
        dtype's minimum elsewhere.
        """
        if self.wrapped == "sdpa":
            return visible[:, None]
        mask = torch.zeros(visible.shape, dtype=self.query.dtype, device=visible.device)
        return mask.masked_fill(~visible, torch.finfo(self.query.dtype).min)[:, None]


class AttentionRoute(Protocol):
    """What the wrapper hands a layer's attention call to (a :class:`~kvpress_mm.CompressionSession`)."""

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, Any]:
        """The layer's attention output (and weights), computed or wrapped by the session."""


#: Keyword arguments of the attention call that change its math when set (not None / not False):
#: with any of them, the model's own attention runs and the sums are computed lazily.
MATH_CHANGING_KWARGS = (
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


class ActiveSessions:
    """Which session compresses each attention module and each model.

    Process-wide (:data:`ACTIVE`) because transformers' attention interface is: the registered
    wrapper is one function for every model, and finds its session here. Weak keys, so an
    entry never keeps a model alive.
    """

    def __init__(self) -> None:
        self._by_module: weakref.WeakKeyDictionary[nn.Module, AttentionRoute] = weakref.WeakKeyDictionary()
        self._by_model: weakref.WeakKeyDictionary[nn.Module, AttentionRoute] = weakref.WeakKeyDictionary()

    def for_module(self, module: nn.Module) -> AttentionRoute | None:
        """The session compressing ``module``'s layer, if any."""
        return self._by_module.get(module)

    def for_model(self, model: nn.Module) -> AttentionRoute | None:
        """The session active on ``model``, if any."""
        return self._by_model.get(model)

    def activate(self, session: AttentionRoute, model: nn.Module, modules: list[nn.Module]) -> None:
        """Route ``modules``' attention calls to ``session``."""
        for module in modules:
            self._by_module[module] = session
        self._by_model[model] = session

    def deactivate(self, session: AttentionRoute, model: nn.Module, modules: list[nn.Module]) -> None:
        """Forget ``session``'s routes (the entries of another session are left alone)."""
        for module in modules:
            if self._by_module.get(module) is session:
                del self._by_module[module]
        if self._by_model.get(model) is session:
            del self._by_model[model]


#: The process-wide routes from attention modules and models to their sessions.
ACTIVE = ActiveSessions()


#: Warned once per session (and once per chunked prefill) when a model has sliding-window layers.
SLIDING_LAYERS_LEFT = (
    "kvpress-mm leaves sliding-window attention layers uncompressed (they already keep only "
    "their window); full-attention layers are compressed"
)


def sliding_window_call(call: AttentionCall, cache: Any) -> bool:
    """True when ``call`` attends over a sliding-window layer, which compression leaves as transformers keeps it.

    Such layers already hold at most their window; their cache and mask logic keys on counts
    that compression would break (and transformers chunks their prefill itself).
    """
    return bool(
        getattr(cache.layers[call.layer_idx], "is_sliding", False) or call.kwargs.get("sliding_window") is not None
    )


def original_attention(module: nn.Module, wrapped: str) -> AttentionFunction:
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
        original = original_attention(module, wrapped)
        session = ACTIVE.for_module(module)
        if session is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        return session.attend(AttentionCall(module, query, key, value, attention_mask, kwargs, original, wrapped))

    attention.__name__ = f"{ATTENTION_PREFIX}{wrapped}_attention"
    return attention


def register_attention_functions() -> None:
    """Register the wrappers with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for wrapped, mask_function in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        # registering again replaces an equivalent function: harmless, and no flag to keep
        AttentionInterface.register(ATTENTION_PREFIX + wrapped, _make_attention_function(wrapped))
        # without a mask function of the same name, transformers would build no mask at all
        AttentionMaskInterface.register(ATTENTION_PREFIX + wrapped, mask_function)


def fusable(call: AttentionCall, modality: torch.Tensor) -> bool:
    """True when :func:`~kvpress_mm.ops.scoring.attention_with_column_sums` computes what the original would.

    That is plain scaled causal softmax attention over the whole prompt: inference (no
    dropout, no gradient), an explicit ``scaling``, none of :data:`MATH_CHANGING_KWARGS`,
    no attention weights asked for, shapes of a prefill on an empty cache, and for ``eager``
    the standard ``eager_attention_forward`` (the mask is checked separately).
    """
    module, query, key, value, kwargs = call.module, call.query, call.key, call.value, call.kwargs
    if module.training or float(kwargs.get("dropout") or 0.0) != 0.0:
        return False
    if kwargs.get("scaling") is None:
        return False
    for name in MATH_CHANGING_KWARGS:
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
    if call.wrapped == "eager":
        return is_standard_eager(module) and not attention_weights_requested(module)
    return True


def is_standard_eager(module: nn.Module) -> bool:
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


def attention_weights_requested(module: nn.Module) -> bool:
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


def mask_is_causal_with_padding(mask: torch.Tensor, key_valid: torch.Tensor, wrapped: str) -> bool:
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


class MaskChecks:
    """Whether the attention masks of the current model call are plain causal + padding masks.

    transformers passes the same mask tensor to every layer of a call, so each is checked once
    (:func:`mask_is_causal_with_padding`, row block by row block so that the check allocates no
    ``[B, P, P]`` temporary) and the verdict is remembered until :meth:`clear`.
    """

    def __init__(self) -> None:
        self._verdicts: list[tuple[weakref.ref[torch.Tensor], bool]] = []

    def clear(self) -> None:
        """Forget the verdicts (a new model call starts)."""
        self._verdicts.clear()

    def plain_causal(self, call: AttentionCall, key_valid: torch.Tensor) -> bool:
        """True when the original attention would mask exactly causal + the call's padding."""
        attention_mask, wrapped = call.attention_mask, call.wrapped
        padded = not bool(key_valid.all())
        length = int(key_valid.shape[-1])
        if attention_mask is None:
            if wrapped == "eager":  # eager applies no causal mask of its own
                return length == 1 and not padded
            is_causal = call.kwargs.get("is_causal")
            is_causal = getattr(call.module, "is_causal", True) if is_causal is None else is_causal
            # sdpa_attention_forward: is_causal=True when there is no mask (and more than one query)
            return not padded and (bool(is_causal) or length == 1)
        for checked, verdict in self._verdicts:
            if checked() is attention_mask:
                return verdict
        verdict = mask_is_causal_with_padding(attention_mask, key_valid, wrapped)
        self._verdicts.append((weakref.ref(attention_mask), verdict))
        return verdict
