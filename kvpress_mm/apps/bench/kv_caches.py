"""The KV caches the accuracy benchmark runs on: transformers' ``DynamicCache`` (default) or a ``QuantizedCache``.

A quantized cache stores the prefilled context quantized (and, after compression, only the
entries the strategy keeps: the two levers compose). The names are ``BACKEND-NBITSbit`` (and
``fp8``), with transformers' defaults otherwise, except the group size: the largest of 64, 32,
16, 8, ... that divides the model's ``head_dim``, so that every kept length can be quantized
(transformers' default 64 does not divide the shipped reference model's ``head_dim`` 24).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from kvpress_mm.cache.quantized import require_backend_package

#: The caches by name (``dynamic``: no quantization).
KV_CACHES: dict[str, dict[str, Any]] = {
    "dynamic": {},
    "quanto-4bit": {"backend": "quanto", "nbits": 4},
    "quanto-2bit": {"backend": "quanto", "nbits": 2},
    "hqq-4bit": {"backend": "hqq", "nbits": 4},
    "hqq-8bit": {"backend": "hqq", "nbits": 8},
    "fp8": {"backend": "fp8"},
}
#: transformers' default group size, used when it divides head_dim.
DEFAULT_GROUP_SIZE = 64


def group_size_for(head_dim: int) -> int:
    """The largest power of two up to 64 that divides ``head_dim`` (64 for 64 and 128, 8 for 24)."""
    return math.gcd(DEFAULT_GROUP_SIZE, head_dim)


def cache_settings(name: str, model: Any) -> dict[str, Any]:
    """What the results record about cache ``name`` on ``model``: its name and ``QuantizedCache`` options.

    Raises:
        ValueError: ``name`` is not one of :data:`KV_CACHES`.
        MissingDependencyError: the backend's package is not installed (names the extra).

    """
    if name not in KV_CACHES:
        raise ValueError(f"unknown KV cache {name!r}; the caches are {', '.join(KV_CACHES)}")
    settings = dict(KV_CACHES[name])
    if not settings:
        return {"name": name}
    require_backend_package(settings["backend"])
    if settings["backend"] != "fp8":
        text = model.config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        settings["q_group_size"] = group_size_for(int(head_dim))
    return {"name": name, **settings}


def cache_factory(settings: dict[str, Any], model: Any) -> Callable[[], Any] | None:
    """A function building a new cache of ``settings`` (:func:`cache_settings`) for ``model``; ``None``: dynamic."""
    options = {k: v for k, v in settings.items() if k != "name"}
    if not options:
        return None
    from transformers.cache_utils import QuantizedCache

    backend = options.pop("backend")
    return lambda: QuantizedCache(backend, model.config, **options)
