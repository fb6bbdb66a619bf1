"""kvpress_mm.cache.quantized on transformers' quantized layers directly: storing, bytes, checks, errors.

The layers are filled through their own ``update`` (as a model would), then compressed with
:func:`~kvpress_mm.cache.surgery.apply_plan`, the session's only way to change a cache layer.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, cache_utils
from transformers.cache_utils import DynamicLayer, QuantizedCache

from kvpress_mm.cache import quantized
from kvpress_mm.cache.surgery import apply_plan, check_cache_layers, compressible, kv_bytes
from kvpress_mm.errors import MissingDependencyError, UnsupportedCacheError
from kvpress_mm.ops.plan import CompressionPlan
from tests.helpers.quantized import CACHE_CONFIGS, cache_params, dequantized, requires

BATCH, HEADS, PROMPT, HEAD_DIM = 1, 2, 256, 16
CONFIG = LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=HEADS, hidden_size=2 * HEAD_DIM)


def layer_of(name: str, **overrides: Any) -> Any:
    config = {**CACHE_CONFIGS[name], **overrides}
    return QuantizedCache(config.pop("backend"), CONFIG, **config).layers[0]


def prompt(length: int = PROMPT, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH, HEADS, length, HEAD_DIM)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def every_other(length: int, keep: int) -> CompressionPlan:
    kept = torch.arange(keep).mul(length // keep)[None, None].expand(BATCH, HEADS, -1).contiguous()
    return CompressionPlan(kept, torch.ones(BATCH, keep, dtype=torch.bool))


@pytest.mark.parametrize("name", cache_params("quanto-4bit", "hqq-8bit", "fp8"))
def test_apply_plan_stores_the_kept_entries_quantized_once_from_full_precision(name: str) -> None:
    keys, values = prompt()
    layer = layer_of(name)
    layer.update(keys, values)  # the prefill: the whole prompt quantized, full precision returned
    plan = every_other(PROMPT, 64)
    apply_plan(layer, plan, keys, values)
    kept = plan.kept_indices[..., None].expand(-1, -1, -1, HEAD_DIM)
    kept_keys, kept_values = keys.gather(2, kept), values.gather(2, kept)
    if name == "fp8":
        expected_keys = layer._dequantize(layer._quantize(kept_keys, scale=layer._quantize(keys)[1]))
    else:
        expected_keys = layer._dequantize(layer._quantize(kept_keys, axis=layer.axis_key))
        assert layer._pending_beam_idx is None
    stored_keys, stored_values = dequantized(layer)
    assert torch.equal(stored_keys, expected_keys)
    assert stored_values.shape == kept_values.shape
    assert layer.cumulative_length == layer.get_seq_length() == 64
    assert layer.keys.numel() == layer.values.numel() == 0  # the residual is empty: nothing stored twice
    # decoding continues as on an uncompressed layer of 64 entries
    new_keys, new_values = prompt(1, seed=1)
    returned, _ = layer.update(new_keys, new_values)
    assert returned.shape[-2] == 65 and layer.get_seq_length() == 65
    assert torch.equal(returned[..., :64, :], stored_keys)


@requires("quanto")
def test_a_pending_beam_reorder_is_dropped_with_the_store_it_was_for() -> None:
    keys, values = prompt(32)
    layer = layer_of("quanto-4bit")
    layer.update(keys[:1].expand(2, -1, -1, -1), values[:1].expand(2, -1, -1, -1))
    layer.reorder_cache(torch.tensor([1, 0]))
    assert layer._pending_beam_idx is not None
    plan = CompressionPlan(torch.arange(8)[None, None].expand(2, HEADS, -1), torch.ones(2, 8, dtype=torch.bool))
    apply_plan(layer, plan, keys[:1].expand(2, -1, -1, -1), values[:1].expand(2, -1, -1, -1))
    assert layer._pending_beam_idx is None  # the new store is already in the current row order


def test_a_quantized_layer_needs_the_entries_its_plan_indexes() -> None:
    layer = layer_of("fp8")
    keys, values = prompt(16)
    layer.update(keys, values)
    with pytest.raises(ValueError, match="needs the keys and values"):
        apply_plan(layer, every_other(16, 4))


@pytest.mark.parametrize("name", cache_params("quanto-4bit", "hqq-8bit", "fp8"))
def test_stored_bytes_multiply_exactly_and_the_residual_adds(name: str) -> None:
    keys, values = prompt()
    full = DynamicLayer()
    full.update(keys, values)
    compressed = DynamicLayer()
    compressed.update(keys, values)
    apply_plan(compressed, every_other(PROMPT, 64))
    quantized_layer, both = layer_of(name), layer_of(name)
    quantized_layer.update(keys, values)
    both.update(keys, values)
    apply_plan(both, every_other(PROMPT, 64), keys, values)
    full_bytes, compressed_bytes = kv_bytes(full), kv_bytes(compressed)
    quantized_bytes, both_bytes = kv_bytes(quantized_layer), kv_bytes(both)
    assert full_bytes == 2 * BATCH * HEADS * PROMPT * HEAD_DIM * 4 and compressed_bytes * 4 == full_bytes
    # bytes per stored element: data plus the group statistics; fp8: one byte plus one scale per tensor
    per_element = {"quanto-4bit": 0.5 + 2 * 4 / 16, "hqq-8bit": 1 + 2 * 4 / 16, "fp8": 1.0}[name]
    elements = 2 * BATCH * HEADS * PROMPT * HEAD_DIM
    scales = 2 * 4 if name == "fp8" else 0
    assert quantized_bytes == elements * per_element + scales
    # both levers: the product of the two savings
    assert both_bytes - scales == pytest.approx((quantized_bytes - scales) * compressed_bytes / full_bytes, abs=0)
    # the residual window adds its full-precision entries on top (quanto / HQQ), and compression leaves it alone
    if name != "fp8":
        for _ in range(CACHE_CONFIGS[name]["residual_length"] - 1):
            both.update(*prompt(1, seed=2))
        residual = 2 * BATCH * HEADS * (CACHE_CONFIGS[name]["residual_length"] - 1) * HEAD_DIM * 4
        assert kv_bytes(both) == both_bytes + residual


@requires("quanto")
def test_a_group_size_that_cannot_take_the_kept_length_is_a_clear_error() -> None:
    layer = layer_of("quanto-4bit", q_group_size=64)  # 2 heads x 26 entries x 16 = 832 = 13 groups of 64
    keys, values = prompt(26)
    layer.update(keys, values)
    with pytest.raises(UnsupportedCacheError, match=r"q_group_size=64.*divides head_dim \(16\)"):
        apply_plan(layer, every_other(26, 13), keys, values)  # 2 x 13 x 16 = 416: not a multiple of 64


class OtherQuantizedLayer(cache_utils.BaseQuantizedLayer):
    """A quantized layer whose quantizer kvpress-mm does not know how to call."""

    def _quantize(self, tensor: torch.Tensor) -> Any:
        return tensor

    def _dequantize(self, q_tensor: Any) -> torch.Tensor:
        return q_tensor


def test_which_quantized_layers_are_supported() -> None:
    fp8 = layer_of("fp8")
    assert quantized.quantized_kind(fp8) == "fp8" and compressible(fp8)
    assert quantized.quantized_kind(DynamicLayer()) is None and not quantized.is_quantized(DynamicLayer())
    other = OtherQuantizedLayer()
    assert quantized.is_quantized(other) and quantized.quantized_kind(other) is None and not compressible(other)
    cache = QuantizedCache("fp8", CONFIG)
    cache.layers = [other]
    with pytest.raises(UnsupportedCacheError, match="OtherQuantizedLayer is not one of transformers' QuantizedLayer"):
        check_cache_layers(cache)


class IdentityQuantizedLayer(cache_utils.QuantizedLayer):
    """A group-quantized layer that needs no backend package (stores its entries as they are)."""

    def _quantize(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        return tensor.clone()

    def _dequantize(self, q_tensor: torch.Tensor) -> torch.Tensor:
        return q_tensor


def test_older_transformers_releases_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = IdentityQuantizedLayer()
    assert quantized.quantized_kind(layer) == "group"
    monkeypatch.delattr(cache_utils, "BaseQuantizedLayer")  # as in transformers < 5.23
    assert quantized.quantized_kind(layer) is None
    reason = quantized.unsupported_reason(layer)
    assert reason is not None and "transformers >= 5.23" in reason


@requires("quanto")
def test_decode_time_eviction_is_refused_on_group_quantized_caches_only() -> None:
    quanto = QuantizedCache(
        "quanto", CONFIG, **{k: v for k, v in CACHE_CONFIGS["quanto-4bit"].items() if k != "backend"}
    )
    with pytest.raises(UnsupportedCacheError, match=r"H2O evicts .*Turn it off with X=0; or use .*fp8"):
        check_cache_layers(quanto, evicts_while_decoding=True, strategy="H2O", remedy="Turn it off with X=0")
    check_cache_layers(quanto)  # prompt compression alone is fine
    check_cache_layers(QuantizedCache("fp8", CONFIG), evicts_while_decoding=True, strategy="H2O")


def test_row_methods_other_than_reorder_are_refused_on_quantized_caches() -> None:
    cache = QuantizedCache("fp8", CONFIG)
    quantized.check_row_method(cache, "reorder_cache")
    for method in ("batch_select_indices", "batch_repeat_interleave"):
        with pytest.raises(UnsupportedCacheError, match=f"cache.{method} is not supported on a quantized cache"):
            quantized.check_row_method(cache, method)
    quantized.check_row_method(cache_utils.DynamicCache(), "batch_select_indices")


@pytest.mark.parametrize(("backend", "check", "package"), [
    ("quanto", "is_optimum_quanto_available", "optimum-quanto"),
    ("hqq", "is_hqq_available", "hqq"),
    (None, "is_optimum_quanto_available", "optimum-quanto"),  # transformers' default backend
])  # fmt: skip
def test_a_missing_backend_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, backend: str | None, check: str, package: str
) -> None:
    monkeypatch.setattr(cache_utils, check, lambda: False)
    cache_config = {} if backend is None else {"backend": backend}
    config = GenerationConfig(cache_implementation="quantized", cache_config=cache_config)
    with pytest.raises(MissingDependencyError, match=rf"needs {package}.*pip install 'kvpress-mm\[quant\]'"):
        quantized.require_backend(config)
    quantized.require_backend(GenerationConfig(cache_implementation="quantized", cache_config={"backend": "fp8"}))
    quantized.require_backend(GenerationConfig())


def test_an_available_backend_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_utils, "is_hqq_available", lambda: True)
    quantized.require_backend(GenerationConfig(cache_implementation="quantized", cache_config={"backend": "hqq"}))
