"""``chunked-prefill``: feed the prompt in chunks and compress after each, so a long prompt never fills the cache.

The session does the feeding (:mod:`kvpress_mm.session.chunked`); this wrapper asks for it and
hands each chunk's re-plan to its inner strategy.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kvpress_mm.compressor import Compressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.views import LayerView
from kvpress_mm.wrappers.base import Wrapper, chain


class ChunkedPrefill(Wrapper):
    """Prefills the prompt in chunks of ``chunk_size``, compressing every layer with the inner strategy after each.

    **The schedule.** The prompt (``L`` positions) is fed in chunks of ``chunk_size``; the last may
    be shorter. After chunk ``c`` (positions ``< end``), every layer is compressed to each row's
    budget of the prompt seen so far, the inner strategy's budgets of positions ``< end``
    (``int(L_seen * (1 - compression_ratio))``, at least 1, ``L_seen`` = the row's real tokens so far;
    a layer that holds fewer keeps them all); after the last chunk exactly the inner's
    ``n_keep`` of the whole prompt. So no layer ever holds more than its budget after the previous
    chunk plus one chunk: the prefill's peak KV memory is about ``budget + chunk_size`` per layer
    instead of ``L`` (``session.report.kv_bytes_peak`` measures it).

    **What each chunk sees.** The vision tower and the embeddings run once, on the whole prompt
    (whole images), and positions, Qwen's multimodal RoPE included, are computed for the whole
    prompt; only the text decoder runs chunk by chunk. In every layer, chunk ``c``'s queries
    attend to the layer's cache after chunk ``c - 1`` (already compressed) plus the chunk itself
    causally, so the hidden states (and the prompt's last logits) differ from a one-shot
    prefill by design: that is what bounds the memory and the attention cost.

    **The chunked definition of an inner strategy**: after chunk ``c``, the inner strategy plans
    the layer as it would plan a prompt whose entries are the layer's cached entries (kept from
    chunks ``< c``) followed by chunk ``c``'s, with chunk ``c``'s queries (a
    :class:`~kvpress_mm.ops.cache_view.CacheView`):

    - ``snapkv``: its observation window is the chunk's last ``window_size`` queries (all of the
      chunk's if it is shorter), their pooled attention over the cached entries and the chunk,
      the window protected; the final plan's window is the prompt's last ``window_size`` positions;
    - ``h2o`` and the LOOK-M strategies: the accumulated attention of an entry is the sum of the
      attention it received from **every** query of every chunk so far (each query over the
      compressed cache it saw), carried across chunks along the kept entries (H2O's own online
      accumulation); the LOOK-M merging variants merge each chunk's evicted entries into the
      kept ones, so a kept entry may carry merges from several chunks; ``h2o`` with
      ``decode_eviction`` continues from these sums while decoding;
    - ``tova``: the attention of the chunk's last query (the prompt's last after the last chunk);
    - ``knorm``, ``streaming``, ``random``: their scores over the cached entries and the chunk
      (``streaming``'s sinks are the prompt's first entries, which it never evicts);
    - ``vl-cache`` (``allocation="online"`` only): post-vision queries among the chunk's (all of
      them when the chunk has no image), budgets split over the layers by the chunk's densities;
    - ``pyramid(inner)`` / ``mixkv(inner)``: their per-layer budgets / selection scores on each
      chunk's view, with the budgets above as the uniform budget.

    The result differs from the one-shot inner strategy by design; with a single chunk
    (``chunk_size >= L``) it is exactly the one-shot strategy.

    **Inner strategies** refused: ``vl-cache`` with ``allocation="deferred"`` (it plans every
    layer at the end of the prefill, which is what chunking avoids: use ``allocation="online"``),
    ``modality-budget`` (it splits each row's budget by the modality counts of the entries it is
    shown, which after the first chunk are the cached entries, not the prompt), and
    ``chunked-prefill(chunked-prefill(...))``. ``decoding(chunked-prefill(inner))`` and
    ``chunked-prefill(decoding(inner))`` both chunk the prefill and bound decoding.

    Later calls on the compressed cache (a second turn) are not chunked. transformers' own
    ``generate(prefill_chunk_size=...)`` stays refused under compression (it cannot split raw
    image inputs); this wrapper is how to prefill in chunks.

    Attributes:
        chunk_size: positions per prefill chunk (default 512).

    Examples:
        >>> Compressor.from_name("chunked-prefill", inner="snapkv", chunk_size=1024).prefill_chunk_size
        1024

    """

    chunk_size: int = Field(default=512, ge=1, description="Positions per prefill chunk.")

    @classmethod
    def check_inner(cls, inner: Compressor) -> None:
        """Refuse inner strategies whose plans cannot follow a chunked prefill."""
        super().check_inner(inner)
        if isinstance(inner, ChunkedPrefill) or inner.prefill_chunk_size is not None:
            raise ValueError("chunked-prefill(chunked-prefill(...)) is meaningless: the prefill is chunked once")
        if inner.defers_plans:
            raise ValueError(
                f"chunked-prefill compresses every layer after each chunk; its inner strategy '{inner.name}' plans "
                "all layers at the end of the prefill, which keeps the whole prompt until then. Use "
                "vl-cache with allocation='online'"
            )
        if any(strategy.name == "modality-budget" for strategy in chain(inner)):
            raise ValueError(
                "chunked-prefill cannot wrap modality-budget: it splits each row's budget by the modality counts "
                "of the entries it is shown, which after the first chunk are the cached entries, not the prompt"
            )

    @property
    def prefill_chunk_size(self) -> int | None:
        """``chunk_size``: the session feeds every prefill in chunks of it."""
        return self.chunk_size

    @property
    def allocates_budgets(self) -> bool:
        """The inner strategy's (``chunked-prefill(pyramid(...))`` has per-layer budgets)."""
        return self.inner.allocates_budgets

    def budgets(self, modality: torch.Tensor) -> tuple[int, ...]:
        """The inner strategy's budgets (of the prompt seen so far, for an intermediate chunk)."""
        return self.inner.budgets(modality)

    def plan(self, layer: LayerView) -> CompressionPlan:
        """The inner strategy's plan of the chunk's view (or of the whole prompt, with a single chunk)."""
        return self.inner.plan(layer)


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``chunked-prefill``."""
    register("chunked-prefill", ChunkedPrefill)
