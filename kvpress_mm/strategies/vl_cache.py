"""``vl-cache``: modality-aware scores and sparsity-adaptive layer budgets.

Paper: Tu, Vashchilenko, Lu, Xu, "VL-Cache: Sparsity and Modality-Aware KV Cache Compression for
Vision-Language Model Inference Acceleration", ICLR 2025, https://arxiv.org/abs/2410.23317
(no official code; the public implementation is EffiVLM-Bench's ``VlCacheKVCluster``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from kvpress_mm.compressor import ScoredCompressor
from kvpress_mm.errors import InvalidPlanError
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.modality import Modality
from kvpress_mm.ops.allocation import online_share, water_fill
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.scoring import attention_column_sums_and_density, group_mean
from kvpress_mm.ops.selection import check_scores, select_top_with_window
from kvpress_mm.ops.views import LayerView

Allocation = Literal["deferred", "online"]

# where a layer's statistics wait between observe() and the plan (popped when planned)
_STATISTICS = "vl_cache"
# the online allocation's running totals, shared by the layers of one prefill call
_ONLINE = "vl_cache_online"


class VLCache(ScoredCompressor):
    """Post-vision attention scores, with per-layer budgets that follow each layer's attention density.

    Per row (prompt length ``L``, budget ``n_keep``), ``N`` compressed layers:

    1. **Post-vision queries** ``P``: the positions after the row's last image/video entry (the
       question after the images; delimiter tokens such as ``<vision_end>`` are text, so they
       belong to ``P``). If the row has no image/video entry, or nothing follows the last one,
       ``P`` is its last ``min(fallback_window, L)`` positions (EffiVLM raises there).
    2. **Density** of layer ``l``: the share of (query in ``P``, visible key) pairs whose
       probability is at least ``threshold`` times the query's largest one, averaged over the
       query heads (``1 - sparsity`` of the paper's Algorithm 1). Float32.
    3. **Score** of entry ``j``: ``sum_{q in P} A[h, q, j]`` averaged over the query heads of each
       KV group (``shared_heads=True``: over all query heads, one ranking for every KV head,
       EffiVLM's default).
    4. **Window** ``w = int(window_ratio * n_keep)``: the last ``w`` entries, kept in every layer.
    5. **Budgets**: the other ``T = N * (n_keep - w)`` entries are split over the layers in
       proportion to their densities: ``a[l] = clip(c * d[l], lo, hi)`` with the scale ``c`` that
       makes them sum to ``T``, ``lo = min(n_keep - w, max(1, int(min_layer_ratio * L)))``,
       ``hi = L - w``, rounded by largest remainder (ties to the lower layer) so that the total is
       exactly ``N * n_keep``. Layer ``l`` keeps its window plus its ``a[l]`` highest-scoring other
       entries, per KV head. Equal densities give every layer ``n_keep``.

    The paper and EffiVLM clip ``d[l] / sum(d) * alpha * L`` to ``[0.01, 1]`` without
    renormalising, so their totals drift from the budget; here the total is exact (the deviation
    is the renormalisation only).

    ``allocation="deferred"`` (default, as the paper and EffiVLM): each layer only records its
    statistics right after its prefill attention, and keeps its full cache until the prefill's
    last layer; then every layer is planned from all ``N`` densities and compressed. The prompt's
    forward pass is unchanged (a layer's cache is read only by its own attention), but the
    prefill's peak memory is that of an uncompressed prefill, plus ``N * kv_heads * L`` float32
    scores. ``allocation="online"`` compresses each layer right after its attention: layer ``l``
    estimates each later layer's density by the mean density of layers ``0..l``, takes
    ``round_half_down(R * d[l] / (d[l] + (N - 1 - l) * mean))`` of the remaining ``R`` (clamped so
    that the later layers can still get ``[lo, hi]`` each), and the last layer takes the rest: the
    total is still exact and the peak is that of the other strategies, but layer 0 always gets
    ``T / N`` and each layer is judged against the layers before it only (an approximation of the
    paper's allocation).

    Attributes:
        threshold: a probability is significant when at least this times its query's largest (default 0.01).
        window_ratio: the recent window, as a fraction of ``n_keep`` (default 0.1).
        min_layer_ratio: the least a layer keeps besides the window, as a fraction of ``L`` (default 0.01).
        allocation: ``"deferred"`` (default) or ``"online"``.
        shared_heads: one ranking for all KV heads of a layer (EffiVLM's default), not per KV head.
        fallback_window: queries used as ``P`` when no image/video entry is followed by text (default 32).

    """

    threshold: float = Field(default=0.01, ge=0.0, le=1.0, allow_inf_nan=False, description="Significance threshold.")
    window_ratio: float = Field(default=0.1, ge=0.0, le=1.0, allow_inf_nan=False, description="Window / n_keep.")
    min_layer_ratio: float = Field(default=0.01, ge=0.0, le=1.0, allow_inf_nan=False, description="Layer floor / L.")
    allocation: Allocation = Field(default="deferred", description="Plan all layers at the end, or layer by layer.")
    shared_heads: bool = Field(default=False, description="One ranking for every KV head of a layer.")
    fallback_window: int = Field(default=32, ge=1, description="Queries used when no image precedes text.")

    @property
    def defers_plans(self) -> bool:
        """True with ``allocation="deferred"``."""
        return self.allocation == "deferred"

    @property
    def allocates_budgets(self) -> bool:
        """True: vl-cache decides each layer's budget."""
        return True

    def protected_window(self, n_keep: int) -> int:
        """``int(window_ratio * n_keep)``."""
        return min(int(self.window_ratio * n_keep), n_keep)

    def post_vision_starts(self, layer: LayerView) -> list[int]:
        """Each row's first post-vision query (a padded position; see step 1)."""
        media = (layer.modality == Modality.IMAGE) | (layer.modality == Modality.VIDEO)  # [B, P]
        starts = []
        for b in range(layer.batch_size):
            found = media[b].nonzero()
            after = int(found[-1]) + 1 if found.numel() else layer.seq_len
            if after >= layer.seq_len:  # no image/video, or nothing after it
                after = layer.seq_len - min(self.fallback_window, layer.prompt_lengths[b])
            starts.append(after)
        return starts

    def _statistics(self, layer: LayerView) -> tuple[torch.Tensor, list[float]]:
        """``(scores [B, kvH, P] float32, each row's density)``, computed once per layer."""
        stored = layer.state.get(_STATISTICS)
        if stored is None:
            sums, density = attention_column_sums_and_density(
                layer.queries,
                layer.keys,
                layer.scaling,
                layer.key_valid,
                self.post_vision_starts(layer),
                self.threshold,
            )
            if self.shared_heads:
                scores = sums.mean(1, keepdim=True).expand(-1, layer.kv_heads, -1).contiguous()
            else:
                scores = group_mean(sums, layer.kv_heads)
            stored = (scores, [float(d) for d in density.mean(-1).tolist()])
            layer.state[_STATISTICS] = stored
        return stored

    def score(self, layer: LayerView) -> torch.Tensor:
        """Post-vision accumulated attention, ``[batch, kv_heads, seq]`` float32."""
        return self._statistics(layer)[0]

    def observe(self, layer: LayerView) -> None:
        """Compute and keep the layer's scores and densities until the end of the prefill."""
        self._statistics(layer)

    def _bounds(self, layer: LayerView, b: int) -> tuple[int, int, int, int]:
        """Row ``b``'s ``(window, adaptive part per layer on average, lo, hi)``."""
        length, n_keep = layer.prompt_lengths[b], layer.n_keep[b]
        window = self.protected_window(min(n_keep, length))
        rest = min(n_keep, length) - window
        low = min(rest, max(1, int(self.min_layer_ratio * length)))
        return window, rest, low, length - window

    def _select(self, layer: LayerView, budgets: Sequence[int]) -> CompressionPlan:
        """Keep each row's window plus its top other entries, ``budgets[b]`` in all, then :meth:`finish`."""
        scores, _ = layer.state.pop(_STATISTICS)  # not needed while decoding
        view = layer.with_budgets(budgets)
        scores = check_scores(scores, view, type(self).__name__)
        windows = [self._bounds(layer, b)[0] for b in range(layer.batch_size)]
        return self.finish(view, select_top_with_window(view, scores, windows))

    def plan_deferred(self, layers: Sequence[LayerView]) -> list[CompressionPlan]:
        """Split each row's budget over ``layers`` by their densities (step 5), then select in each."""
        if not layers:
            return []
        for layer in layers:
            self._statistics(layer)  # already there when the session called observe()
        first = layers[0]
        per_layer: list[list[int]] = [[] for _ in layers]
        for b in range(first.batch_size):
            window, rest, low, high = self._bounds(first, b)
            densities = [layer.state[_STATISTICS][1][b] for layer in layers]
            parts = water_fill(densities, len(layers) * rest, low, high)
            for budgets, part in zip(per_layer, parts, strict=True):
                budgets.append(window + part)
        return [self._select(layer, budgets) for layer, budgets in zip(layers, per_layer, strict=True)]

    def plan(self, layer: LayerView) -> CompressionPlan:
        """Online: this layer's budget from the layers so far. Deferred: the layer alone (its own ``n_keep``)."""
        if self.defers_plans:
            return self.plan_deferred([layer])[0]
        if layer.num_layers is None or not 0 <= layer.layer_idx < layer.num_layers:
            raise InvalidPlanError(
                f"vl-cache's online allocation needs the view's num_layers (got {layer.num_layers} for layer "
                f"{layer.layer_idx}): build the LayerView with num_layers"
            )
        densities = self._statistics(layer)[1]
        later = layer.num_layers - 1 - layer.layer_idx
        running = layer.call_state.setdefault(_ONLINE, {"remaining": None, "densities": []})
        if running["remaining"] is None:
            running["remaining"] = [layer.num_layers * self._bounds(layer, b)[1] for b in range(layer.batch_size)]
        running["densities"].append(densities)
        budgets = []
        for b in range(layer.batch_size):
            window, _, low, high = self._bounds(layer, b)
            seen = [d[b] for d in running["densities"]]
            part = online_share(running["remaining"][b], densities[b], sum(seen) / len(seen), later, low, high)
            running["remaining"][b] -= part
            budgets.append(window + part)
        return self._select(layer, budgets)


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``vl-cache``."""
    register("vl-cache", VLCache)
