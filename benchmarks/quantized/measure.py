"""The four layers of one cache configuration and the bytes they store (see :mod:`benchmarks.quantized`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

#: The quantized caches measured: transformers' defaults (axis 0, the group size and residual
#: window of :class:`Config`) for each backend and bit width.
CACHES: dict[str, dict[str, Any]] = {
    "quanto-4bit": {"backend": "quanto", "nbits": 4},
    "quanto-2bit": {"backend": "quanto", "nbits": 2},
    "hqq-4bit": {"backend": "hqq", "nbits": 4},
    "hqq-8bit": {"backend": "hqq", "nbits": 8},
    "fp8": {"backend": "fp8"},
}
#: "both" within this fraction of the product of the two savings.
PRODUCT_TOLERANCE = 0.10


@dataclass(frozen=True)
class Config:
    """What one run measures."""

    length: int = 8192
    ratio: float = 0.8
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    q_group_size: int = 64  # transformers' default
    residual_length: int = 128  # transformers' default
    caches: tuple[str, ...] = tuple(CACHES)
    seed: int = 0
    threads: int | None = None


def cache_kwargs(config: Config, name: str) -> dict[str, Any]:
    """``QuantizedCache`` keywords of the cache ``name`` (fp8 takes no group options)."""
    settings = dict(CACHES[name])
    if settings["backend"] != "fp8":
        settings.update(q_group_size=config.q_group_size, residual_length=config.residual_length)
    return settings


def _layers(config: Config) -> tuple[Any, Any, Any]:
    """The prompt's keys and values ``[1, kv_heads, length, head_dim]`` and a plan keeping ``n_keep`` per head."""
    import torch

    from kvpress_mm.ops.budget import n_keep_for
    from kvpress_mm.ops.plan import CompressionPlan

    generator = torch.Generator().manual_seed(config.seed)
    shape = (1, config.kv_heads, config.length, config.head_dim)
    dtype = getattr(torch, config.dtype)
    keys = torch.randn(shape, generator=generator).to(dtype)
    values = torch.randn(shape, generator=generator).to(dtype)
    n_keep = n_keep_for(config.length, config.ratio)
    # any n_keep entries per KV head: the bytes depend on how many, not which
    scores = torch.rand(1, config.kv_heads, config.length, generator=generator)
    kept = scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values
    return keys, values, CompressionPlan(kept, torch.ones(1, n_keep, dtype=torch.bool))


def measure_cache(config: Config, name: str) -> dict[str, Any]:
    """Bytes of the four layers of cache ``name``, right after the prefill and with a full residual window."""
    import torch
    from transformers import LlamaConfig
    from transformers.cache_utils import DynamicLayer, QuantizedCache

    from kvpress_mm.cache.surgery import apply_plan, kv_bytes

    keys, values, plan = _layers(config)
    model_config = LlamaConfig(
        num_hidden_layers=1,
        num_attention_heads=config.kv_heads,
        num_key_value_heads=config.kv_heads,
        hidden_size=config.kv_heads * config.head_dim,
    )
    settings = cache_kwargs(config, name)

    def quantized_layer() -> Any:
        options = dict(settings)
        return QuantizedCache(options.pop("backend"), model_config, **options).layers[0]

    full, compressed, quantized, both = DynamicLayer(), DynamicLayer(), quantized_layer(), quantized_layer()
    full.update(keys, values)
    compressed.update(keys, values)
    apply_plan(compressed, plan)
    start = time.perf_counter()
    quantized.update(keys, values)  # transformers quantizes the whole prompt at the prefill
    quantize_prompt_s = time.perf_counter() - start
    both.update(keys, values)
    start = time.perf_counter()
    apply_plan(both, plan, keys, values)  # kvpress-mm: the kept entries, quantized once from full precision
    quantize_kept_s = time.perf_counter() - start
    after_prefill = {"full": kv_bytes(full), "compressed": kv_bytes(compressed)}
    after_prefill.update(quantized=kv_bytes(quantized), both=kv_bytes(both))
    row: dict[str, Any] = {
        "settings": settings,
        "n_keep": int(plan.kept_indices.shape[-1]),
        "after_prefill": _judged(after_prefill, residual=0),
        "quantize_prompt_s": quantize_prompt_s,
        "quantize_kept_s": quantize_kept_s,
    }
    if settings["backend"] != "fp8":
        # the worst residual window: residual_length - 1 decoded entries, kept in full precision
        window = config.residual_length - 1
        generator = torch.Generator().manual_seed(config.seed + 1)
        new_shape = (1, config.kv_heads, window, config.head_dim)
        new_keys = torch.randn(new_shape, generator=generator).to(keys.dtype)
        new_values = torch.randn(new_shape, generator=generator).to(keys.dtype)
        for layer in (quantized, both):  # one update: the window fills without flushing
            layer.update(new_keys, new_values)
        residual = 2 * new_keys.numel() * new_keys.element_size()
        # full and compressed stay the prompt's: the window is compared as an additive term
        with_residual = {**after_prefill, "quantized": kv_bytes(quantized), "both": kv_bytes(both)}
        row["with_full_residual"] = _judged(with_residual, residual=residual)
        row["with_full_residual"]["residual_entries"] = window
    return row


def _judged(measured: dict[str, int], residual: int) -> dict[str, Any]:
    """The four byte counts, their fractions of ``full``, and "both" against the product of the savings.

    ``residual`` (the full-precision window's bytes, in "quantized" and "both" alike) is added
    to the product, not multiplied: compression does not shrink the window.
    """
    full, compressed, quantized, both = (measured[k] for k in ("full", "compressed", "quantized", "both"))
    expected = (quantized - residual) * compressed / full + residual
    ratio = both / expected
    return {
        "bytes": measured,
        "fraction_of_full": {k: v / full for k, v in measured.items()},
        "residual_bytes": residual,
        "expected_both_bytes": expected,
        "both_over_expected": ratio,
        "within_tolerance": abs(ratio - 1) <= PRODUCT_TOLERANCE,
    }


def measure(config: Config, log: bool = True) -> dict[str, dict[str, Any]]:
    """Every cache of ``config``, in order; a cache whose backend is not installed is recorded as skipped."""
    import sys

    from transformers import cache_utils

    available = {
        "quanto": cache_utils.is_optimum_quanto_available(),
        "hqq": cache_utils.is_hqq_available(),
        "fp8": True,
    }
    results: dict[str, dict[str, Any]] = {}
    for name in config.caches:
        backend = CACHES[name]["backend"]
        if not available[backend]:
            results[name] = {"skipped": f"{backend} is not installed: pip install 'kvpress-mm[quant]'"}
            continue
        if log:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results[name] = measure_cache(config, name)
    return results
