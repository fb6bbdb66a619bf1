"""transformers' quantized KV-cache layers (``QuantizedCache``: quanto, HQQ, fp8) under compression.

A ``QuantizedCache`` stores each layer's entries quantized (``layer._quantized_keys`` /
``_quantized_values``, in the backend's own layout) plus, for quanto and HQQ, a full-precision
*residual* window of recent entries (``layer.keys`` / ``values``, at most ``residual_length - 1``
entries, re-quantized with the store when it fills); ``layer.cumulative_length`` is the entry
count. At the prefill, transformers quantizes the whole prompt and returns the full-precision
keys and values to the attention call, so the session plans on exactly what a ``DynamicCache``
run would see. :func:`store` then makes the plan's kept (or merged) entries the layer's whole
content: quantized once, from full precision, with the layer's own quantizer, with an empty
residual, which is the state transformers itself leaves after a prefill. Nothing is stored
twice (each kept entry is in the store once, the residual is empty) and nothing is lost
(store + residual = ``cumulative_length``).

Only the layer's own ``_quantize`` / ``_dequantize`` are used, never ``optimum.quanto`` or
``hqq`` directly, so this module imports without the ``[quant]`` extra.

Supported: ``QuantizedLayer`` subclasses (quanto, HQQ: ``_quantize(tensor, axis)``) and
``Fp8QuantizedLayer`` (per-tensor scale frozen at the prefill, no residual), from transformers
5.23 on (earlier releases reorder only the residual under beam search).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import cache_utils

from kvpress_mm.errors import MissingDependencyError, UnsupportedCacheError

#: The optional dependencies that install the quanto and HQQ backends.
EXTRA = "kvpress-mm[quant]"
#: The command that installs them.
INSTALL_EXTRA = f"pip install '{EXTRA}'"
#: The transformers release whose quantized layers kvpress-mm compresses (deferred beam reorder, fp8).
MIN_TRANSFORMERS = "5.23"

#: backend name -> (availability check in ``transformers.cache_utils``, package that provides it)
BACKEND_PACKAGES = {"quanto": ("is_optimum_quanto_available", "optimum-quanto"), "hqq": ("is_hqq_available", "hqq")}


def _layer_class(name: str) -> type | None:
    found = getattr(cache_utils, name, None)
    return found if isinstance(found, type) else None


def is_quantized(layer: Any) -> bool:
    """True for any of transformers' quantized cache layers (supported or not)."""
    classes = tuple(c for c in (_layer_class("BaseQuantizedLayer"), _layer_class("QuantizedLayer")) if c is not None)
    return bool(classes) and isinstance(layer, classes)


def quantized_kind(layer: Any) -> str | None:
    """``"group"`` (quanto, HQQ: a residual window, grouped quantization), ``"fp8"``, or ``None``.

    ``None`` also for a quantized layer kvpress-mm cannot compress (see :func:`unsupported_reason`).
    """
    if _layer_class("BaseQuantizedLayer") is None:  # transformers < 5.23
        return None
    group, fp8 = _layer_class("QuantizedLayer"), _layer_class("Fp8QuantizedLayer")
    if group is not None and isinstance(layer, group):
        return "group"
    if fp8 is not None and isinstance(layer, fp8):
        return "fp8"
    return None


def unsupported_reason(layer: Any) -> str | None:
    """Why the quantized ``layer`` cannot be compressed, or ``None`` (not quantized, or supported)."""
    if not is_quantized(layer) or quantized_kind(layer) is not None:
        return None
    if _layer_class("BaseQuantizedLayer") is None:
        import transformers

        return (
            f"compressing a quantized cache needs transformers >= {MIN_TRANSFORMERS} (this is "
            f"{transformers.__version__}, whose quantized layers reorder only their residual under beam search); "
            f"upgrade transformers, or {INSTALL_EXTRA} which requires it"
        )
    return (
        f"{type(layer).__name__} is not one of transformers' QuantizedLayer (quanto, HQQ) or Fp8QuantizedLayer "
        "classes, whose quantizers kvpress-mm knows how to call"
    )


def _empty(like: torch.Tensor) -> torch.Tensor:
    # what QuantizedLayer.update leaves after a flush: a 1-D empty tensor of the cache's dtype
    return torch.tensor([], dtype=like.dtype, device=like.device)


def store(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make ``keys`` / ``values`` ``[B, kvH, n, D]`` the quantized layer's whole content.

    Quantized with the layer's own quantizer (its axes and group size; fp8: the scale frozen at
    the prefill), an empty full-precision residual, ``cumulative_length = n``, and no deferred
    beam reorder (the new store is in the current row order). Decoding then fills the residual
    and flushes it exactly as for an uncompressed cache of ``n`` entries.

    Raises:
        UnsupportedCacheError: the layer's quantizer cannot take the kept entries' shape (a
            ``q_group_size`` that fits the prompt but not the kept length).

    """
    kind = quantized_kind(layer)
    if kind is None:
        raise UnsupportedCacheError(unsupported_reason(layer) or f"{type(layer).__name__} is not a quantized layer")
    # the residual first: HQQ's quantizer reads the compute dtype and device from layer.keys
    layer.keys, layer.values = _empty(keys), _empty(values)
    keys, values = keys.contiguous(), values.contiguous()
    if kind == "fp8":
        layer._quantized_keys = layer._quantize(keys, scale=layer._quantized_keys[1])
        layer._quantized_values = layer._quantize(values, scale=layer._quantized_values[1])
    else:
        try:
            layer._quantized_keys = layer._quantize(keys, axis=layer.axis_key)
            layer._quantized_values = layer._quantize(values, axis=layer.axis_value)
        except (ValueError, RuntimeError, AssertionError) as error:
            raise UnsupportedCacheError(_shape_message(layer, keys, error)) from error
        layer._pending_beam_idx = None
    layer.cumulative_length = int(keys.shape[-2])


def _shape_message(layer: Any, keys: torch.Tensor, error: BaseException) -> str:
    batch, heads, n, head_dim = keys.shape
    return (
        f"{type(layer).__name__} cannot quantize the {n} entries each KV head keeps after compression "
        f"(cache [{batch}, {heads}, {n}, {head_dim}], q_group_size={layer.q_group_size}, "
        f"axis_key={layer.axis_key}, axis_value={layer.axis_value}, nbits={layer.nbits}): {error}. "
        f"Use a q_group_size that divides head_dim ({head_dim}) with axis_key=axis_value=0, so that every "
        "kept length can be quantized"
    )


def tensor_bytes(stored: Any) -> int:
    """Bytes of the storage behind a quantized store: tensors, quanto's tensor subclasses, HQQ's ``(W_q, meta)``.

    quanto's ``WeightQBitsTensor`` / ``PackedTensor`` are wrapper subclasses whose own
    ``numel() * element_size()`` is that of the unpacked tensor; their inner tensors
    (``__tensor_flatten__``: packed data, scale, shift) are what is allocated.
    """
    if isinstance(stored, Mapping):  # HQQ meta: scale and zero (the rest are Python values)
        return sum(tensor_bytes(v) for v in stored.values())
    if isinstance(stored, (tuple, list)):  # HQQ (W_q, meta), fp8 (data, scale)
        return sum(tensor_bytes(v) for v in stored)
    if isinstance(stored, torch.Tensor):
        if type(stored) is not torch.Tensor and hasattr(stored, "__tensor_flatten__"):
            names, _ = stored.__tensor_flatten__()
            return sum(tensor_bytes(getattr(stored, name)) for name in names)
        return stored.numel() * stored.element_size()
    return 0


def stored_bytes(layer: Any) -> int:
    """Bytes a quantized layer holds: its quantized store plus its full-precision residual."""
    residual = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))
    return residual + tensor_bytes(layer._quantized_keys) + tensor_bytes(layer._quantized_values)


def shared_entries(layer: Any) -> tuple[Any, ...]:
    """What a fork of a quantized layer may share with it: its quantized store and residual window.

    transformers' quantized layers never write them in place (an update concatenates a new
    residual, a flush re-quantizes into new objects), so two caches can hold the same objects.
    """
    return (layer._quantized_keys, layer._quantized_values, layer.keys, layer.values)


def check_decode_eviction(cache: Any, strategy: str, remedy: str) -> None:
    """Refuse decode-time eviction on a quanto / HQQ cache, before the first token.

    Evicting while decoding would rebuild the quantized store at every step: one full
    quantization of the layer's cache per layer and step (transformers quantizes only once every
    ``residual_length`` steps), which also empties the full-precision residual window at every
    step. fp8 caches are allowed: their per-tensor scale is frozen, so re-quantizing kept
    entries with it gives back their stored bytes exactly.
    """
    for layer_idx, layer in enumerate(getattr(cache, "layers", None) or ()):
        if quantized_kind(layer) == "group":
            raise UnsupportedCacheError(
                f"{strategy} evicts cache entries while decoding, which on a {type(layer).__name__} cache (layer "
                f"{layer_idx}) would re-quantize the whole cache at every step and bypass its full-precision residual "
                f"window. {remedy}; or use QuantizedCache(backend='fp8') (evicts exactly) or a DynamicCache"
            )


def check_row_method(cache: Any, method: str) -> None:
    """Refuse ``batch_select_indices`` / ``batch_repeat_interleave`` / ``crop`` on a cache with quantized layers.

    transformers' quantized layers inherit them from ``DynamicLayer``: they change the
    full-precision residual only, not the quantized store, so the entries would no longer match.
    (``reorder_cache``, what beam search calls, is implemented by the quantized layers.)
    """
    if method == "reorder_cache":
        return
    layers = getattr(cache, "layers", None) or ()
    quantized = next((layer for layer in layers if is_quantized(layer)), None)
    if quantized is not None:
        raise UnsupportedCacheError(
            f"cache.{method} is not supported on a quantized cache: transformers' {type(quantized).__name__} "
            "applies it to its full-precision residual only, not to its quantized entries. Only reorder_cache "
            "(beam search) changes a quantized cache correctly; assisted decoding (which crops) needs a DynamicCache"
        )


def require_backend(generation_config: Any) -> None:
    """Raise a :class:`~kvpress_mm.errors.MissingDependencyError` naming the extra when a quantized backend is missing.

    For ``generate(cache_implementation="quantized", cache_config={"backend": ...})``: checked
    before transformers builds the cache (whose own ``ImportError`` names only the package).
    """
    if getattr(generation_config, "cache_implementation", None) != "quantized":
        return
    cache_config = getattr(generation_config, "cache_config", None) or {}
    if not isinstance(cache_config, Mapping):
        cache_config = vars(cache_config) if hasattr(cache_config, "__dict__") else {}
    require_backend_package(str(cache_config.get("backend", "quanto")))  # quanto: transformers' default


def require_backend_package(backend: str) -> None:
    """Raise a :class:`~kvpress_mm.errors.MissingDependencyError` naming the extra if ``backend``'s package is missing.

    ``"fp8"`` (and a name transformers will reject itself) needs nothing.
    """
    if backend not in BACKEND_PACKAGES:
        return
    check, package = BACKEND_PACKAGES[backend]
    available = getattr(cache_utils, check, None)
    if callable(available) and not available():
        raise MissingDependencyError(
            f"a quantized KV cache with backend {backend!r} needs {package}, which is not installed: "
            f"{INSTALL_EXTRA} (installs optimum-quanto and hqq), or use the 'fp8' backend, which needs no "
            "extra package"
        )
