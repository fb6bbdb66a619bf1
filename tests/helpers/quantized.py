"""transformers' quantized caches in tests: backends (skipped without the [quant] extra) and an exact reference.

The reference of a compressed run on a quantized cache is the same run on a ``DynamicCache``
whose compressed layers are replaced, right after each plan is applied, by
``dequantize(quantize(kept entries))`` with the same backend and settings
(:class:`StoreRecorder` with ``qdq``): the quantized run must produce exactly its kept
positions, stored entries, tokens and logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import cache_utils
from transformers.cache_utils import QuantizedCache

import kvpress_mm.cache.surgery as cache_surgery
import kvpress_mm.session.chunked as chunked_module
import kvpress_mm.session.context as session_module
from kvpress_mm.cache.quantized import quantized_kind

INSTALL = "pip install 'kvpress-mm[quant]' (scripts/setup.sh installs it)"

#: The cache configs of the tests: group sizes divide the tiny models' head_dim (16), and the
#: residual window (64) is longer than any generation, so decoded entries stay in full precision.
CACHE_CONFIGS: dict[str, dict[str, Any]] = {
    "quanto-4bit": {"backend": "quanto", "nbits": 4, "q_group_size": 16, "residual_length": 64},
    "hqq-8bit": {"backend": "hqq", "nbits": 8, "q_group_size": 16, "residual_length": 64},
    "fp8": {"backend": "fp8"},
}


def backend_available(backend: str) -> bool:
    """True when transformers can build ``backend``'s layers here (fp8 needs no extra package)."""
    if backend == "quanto":
        return bool(cache_utils.is_optimum_quanto_available())
    if backend == "hqq":
        return bool(cache_utils.is_hqq_available())
    return True


def requires(backend: str) -> pytest.MarkDecorator:
    """Skip when ``backend``'s package (the [quant] extra) is missing, and say how to install it."""
    package = {"quanto": "optimum-quanto", "hqq": "hqq"}.get(backend, backend)
    return pytest.mark.skipif(not backend_available(backend), reason=f"{package} is not installed: {INSTALL}")


def cache_params(*names: str) -> list[Any]:
    """``pytest.param`` of each named cache config, skipped when its backend is missing."""
    return [pytest.param(name, id=name, marks=requires(CACHE_CONFIGS[name]["backend"])) for name in names]


ALL_CACHES = cache_params(*CACHE_CONFIGS)


def quantized_cache(model: Any, name: str, **overrides: Any) -> QuantizedCache:
    """A ``QuantizedCache`` of the config ``name`` (:data:`CACHE_CONFIGS`) for ``model``."""
    config = {**CACHE_CONFIGS[name], **overrides}
    return QuantizedCache(config.pop("backend"), model.config, **config)


def generate_options(name: str, **overrides: Any) -> dict[str, Any]:
    """``generate`` keywords that make transformers build the cache ``name`` itself."""
    return {"cache_implementation": "quantized", "cache_config": {**CACHE_CONFIGS[name], **overrides}}


def dequantized(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized layer's stored keys and values, dequantized with its own dequantizer."""
    return layer._dequantize(layer._quantized_keys), layer._dequantize(layer._quantized_values)


def round_trip(quantizer: Any, keys: torch.Tensor, values: torch.Tensor, scales: Any = None) -> tuple[Any, Any]:
    """``dequantize(quantize(x))`` of keys and values with ``quantizer`` (a quantized layer of the backend).

    Whole tensors at once (HQQ groups span tokens and heads), including filler slots. fp8 uses
    ``scales`` ``(key scale, value scale)``: the ones frozen at the prefill.
    """
    if quantized_kind(quantizer) == "fp8":
        key_scale, value_scale = scales
        return (
            quantizer._dequantize(quantizer._quantize(keys, scale=key_scale)),
            quantizer._dequantize(quantizer._quantize(values, scale=value_scale)),
        )
    return (
        quantizer._dequantize(quantizer._quantize(keys.contiguous(), axis=quantizer.axis_key)),
        quantizer._dequantize(quantizer._quantize(values.contiguous(), axis=quantizer.axis_value)),
    )


def fresh_quantizer(model: Any, name: str, dtype: torch.dtype = torch.float32) -> Any:
    """One layer of a new cache of config ``name``, ready to quantize tensors of ``dtype``."""
    layer = quantized_cache(model, name).layers[0]
    layer.keys = layer.values = torch.tensor([], dtype=dtype)  # HQQ reads the compute dtype from its residual
    return layer


@dataclass
class Stored:
    """One plan the session applied to a cache layer, and what the layer held right after."""

    layer: Any
    prefill: bool
    kept_indices: torch.Tensor
    merged_keys: torch.Tensor | None
    keys: torch.Tensor  # the layer's entries right after (dequantized for a quantized layer)
    values: torch.Tensor
    raw_keys: torch.Tensor | None = None  # a reference layer's kept entries before the round trip
    raw_values: torch.Tensor | None = None
    length: int = 0
    source_keys: torch.Tensor | None = None  # the entries the plan indexed (the attention call's)
    source_values: torch.Tensor | None = None


class StoreRecorder:
    """Records every plan the session applies and what the layer holds right after.

    With ``qdq`` (a quantized layer of the backend), a ``DynamicCache`` layer's kept entries
    are then replaced by their round trip (:func:`round_trip`): the exact reference of a
    quantized run. fp8 needs the prompt's scales: taken from the prompt when a layer's first
    plan is applied, as transformers calibrates them.
    """

    def __init__(self, qdq: Any = None) -> None:
        self.qdq = qdq
        self.stored: list[Stored] = []
        self._scales: dict[int, Any] = {}

    @contextmanager
    def recording(self) -> Iterator[StoreRecorder]:
        original: Callable[..., None] = cache_surgery.apply_plan
        # the session applies prompt and decode plans, the chunked prefill each chunk's plan
        appliers = (session_module, chunked_module)
        assert all(m.apply_plan is original for m in appliers), "the session no longer applies plans via apply_plan"

        def recording_apply_plan(layer: Any, plan: Any, *source: Any) -> None:
            prefill = id(layer) not in self._scales
            if prefill:
                self._scales[id(layer)] = self._prompt_scales(layer, source)
            original(layer, plan, *source)
            raw_keys = raw_values = None
            if quantized_kind(layer) is not None:
                keys, values = dequantized(layer)
            else:
                keys, values = layer.keys.clone(), layer.values.clone()
                if self.qdq is not None:
                    raw_keys, raw_values = keys, values
                    keys, values = round_trip(self.qdq, keys, values, self._scales[id(layer)])
                    layer.keys, layer.values = keys.clone(), values.clone()
            self.stored.append(
                Stored(
                    layer,
                    prefill,
                    plan.kept_indices.clone(),
                    None if plan.keys is None else plan.keys.clone(),
                    keys,
                    values,
                    raw_keys,
                    raw_values,
                    int(layer.get_seq_length()),
                    source[0].clone() if source else None,
                    source[1].clone() if source else None,
                )
            )

        for module in appliers:
            module.apply_plan = recording_apply_plan  # type: ignore[attr-defined]
        try:
            yield self
        finally:
            for module in appliers:
                module.apply_plan = original  # type: ignore[attr-defined]

    def _prompt_scales(self, layer: Any, source: tuple[Any, ...]) -> Any:
        if self.qdq is None or quantized_kind(self.qdq) != "fp8":
            return None
        keys, values = source if source else (layer.keys, layer.values)
        return self.qdq._quantize(keys)[1], self.qdq._quantize(values)[1]

    def prefill_of(self, cache: Any) -> list[Stored]:
        """The prefill record of each of ``cache``'s layers, in layer order."""
        found = {}
        for record in self.stored:
            for i, layer in enumerate(cache.layers):
                if layer is record.layer and record.prefill:
                    found[i] = record
        return [found[i] for i in sorted(found)]

    def decode_of(self, cache: Any, layer_idx: int) -> list[Stored]:
        """The decode-time records of ``cache.layers[layer_idx]``, in order."""
        layer = cache.layers[layer_idx]
        return [r for r in self.stored if r.layer is layer and not r.prefill]
