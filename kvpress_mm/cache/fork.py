"""Forking a cache: one compressed context, many questions, the context's entries shared.

``fork_cache(cache)`` returns an independent cache that continues exactly like ``cache`` would
(compressed or not), for asking another question about the same context: everything is copied
except the layers' keys and values, which the fork shares with ``cache`` until one of them
appends. transformers' ``DynamicLayer`` never writes its tensors in place (``update`` makes new
ones), and a :class:`~kvpress_mm.cache.growing.GrowingLayer` is told its buffers are shared
(copy-on-write), so neither cache ever sees the other's tokens.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from transformers.cache_utils import DynamicLayer

from kvpress_mm.cache import quantized
from kvpress_mm.cache.growing import GrowingLayer

CacheT = TypeVar("CacheT")


def fork_cache(cache: CacheT) -> CacheT:
    """An independent copy of ``cache`` that shares its keys and values until either appends.

    Made for the "compress a long context once, ask many questions" pattern: prefill the
    context once under a compressor, then continue a fork of its cache for each question.
    Each answer is exactly the one a fresh compression of the context would give, and the
    context's cache is left as it was for the next fork.

    ```python
    import torch
    from transformers import DynamicCache
    from kvpress_mm import Compressor, fork_cache

    with Compressor.from_name("snapkv", compression_ratio=0.8)(model):
        context_cache = DynamicCache(config=model.config)
        model(**context_inputs, cache=context_cache, use_cache=True)  # compressed here, once
        for question_ids in questions:  # [1, q] token ids of each question
            mask = torch.ones(1, context_length + question_ids.shape[1], dtype=torch.long)
            out = model.generate(input_ids=question_ids, attention_mask=mask,
                                 cache=fork_cache(context_cache), max_new_tokens=32)
    ```

    What a fork costs: the session's small per-cache state (budgets, slot masks, positions,
    strategy state such as ``h2o``'s scores) is copied; the keys and values of
    ``DynamicLayer`` and ``GrowingLayer`` layers, and the quantized store and residual window of
    a ``QuantizedCache``'s layers, are shared, and each cache pays its own copy
    of a layer on its first decoding step (``DynamicLayer`` copies the whole layer at every
    step anyway; a shared ``GrowingLayer`` reallocates once, then appends in place again).
    Forks waiting for their turn therefore cost no cache memory; forks decoding at the same
    time each hold their own copy. Other layer types (sliding-window, static, ...) are copied.

    ``copy.copy(cache)`` is not a fork: it shares the layer objects themselves, so decoding one
    changes the other. ``copy.deepcopy(cache)`` is a full, independent copy (of the filled
    part of growing buffers only).

    Args:
        cache: a transformers cache (``DynamicCache``), compressed by a
            :class:`~kvpress_mm.CompressionSession` or not.

    Returns:
        The fork: a cache of the same class. Continue it inside ``with compressor(model)``
            (any compressor), as the original would have been.

    Raises:
        TypeError: ``cache`` has no ``layers`` (not a transformers cache).

    """
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        raise TypeError(
            f"fork_cache needs a transformers cache with layers (a DynamicCache), not a {type(cache).__name__}"
        )
    memo: dict[int, Any] = {}
    growing: list[int] = []
    for index, layer in enumerate(layers):
        if type(layer) is DynamicLayer:  # never writes its tensors in place: share them as they are
            tensors: tuple[Any, ...] = (layer.keys, layer.values)
        elif type(layer) is GrowingLayer:  # writes in place: shared buffers become copy-on-write below
            tensors = layer.buffers
            growing.append(index)
        elif quantized.is_quantized(layer):  # never writes its store or residual in place either
            tensors = quantized.shared_entries(layer)
        else:
            continue
        for tensor in tensors:
            if tensor is not None:
                memo[id(tensor)] = tensor  # deepcopy returns what the memo holds: the same object
    fork = copy.deepcopy(cache, memo)
    for index in growing:
        layers[index].share_buffers()
        fork.layers[index].share_buffers()  # type: ignore[attr-defined]
    return fork
