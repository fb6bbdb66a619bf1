"""``adakv``: the layer's budget shared across its KV heads by the inner strategy's scores (AdaKV).

Paper: Feng, Lv, Cao, Xie, Zhou, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
Allocation for Efficient LLM Inference", NeurIPS 2025, https://arxiv.org/abs/2407.11550
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kvpress_mm.compressor import Compressor, ScoredCompressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.budget import clamp_window
from kvpress_mm.ops.head_budgets import adaptive_head_counts, select_head_counts
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.selection import check_scores
from kvpress_mm.ops.views import LayerView
from kvpress_mm.wrappers.base import Wrapper, refuse_budget_owner


class AdaKV(Wrapper):
    """Lets the KV heads of a layer keep different numbers of entries, at the same total, by their scores.

    Per layer and row (``L`` real entries, budget ``n_keep``, ``H`` KV heads, inner scores ``s``):

    1. the total is ``H * n_keep``, exactly (``n_keep >= L``: everything is kept);
    2. each head first keeps ``floor = int(alpha * n_keep)`` entries by its own scores,
       including the inner strategy's protected window ``w`` (clamped to ``n_keep``), which
       every head always keeps and which counts against the head's share: ``max(floor, w)``
       entries, the window plus its best others;
    3. the remaining ``H * n_keep - H * max(floor, w)`` places go to the highest inner scores
       among all heads' other entries, compared across heads as they are (float32, no
       normalisation); ties go to the lower head, then the earlier position;
    4. a head keeps at most ``L`` entries; the inner strategy's
       :meth:`~kvpress_mm.ScoredCompressor.finish` then runs on the kept sets (LOOK-M merges
       each head's evicted entries into that head's kept ones).

    This is kvpress's ``AdaKVPress`` (its safeguard sets each head's top ``int(alpha * n_keep)``
    scores, window included, to the maximum, then keeps the layer's top ``H * n_keep``). The
    official AdaKV code differs in three ways: its window of 32 is kept outside the adaptive
    budget (every head keeps ``w`` plus its share of ``H * (n_keep - w)``); its safeguard mixes
    the counts, ``round((1 - alpha) * c_h + int(alpha * (n_keep - w)))`` with ``c_h`` the head's
    entries in the layer's top ``H * (n_keep - w)``, instead of "floor first, then the top of the
    rest"; and its total is not exact (rounding).

    **Storage.** The heads of a row keep different numbers of entries, so the layer is stored
    head by head (:class:`~kvpress_mm.cache.ragged.RaggedLayer`): a layer holds
    ``sum_h max_b len(b, h)`` entries (for one row exactly ``H * n_keep`` after the prefill), and
    the session computes its attention head by head with the model's own ``sdpa`` / ``eager``.
    kvpress's ``AdaKVPress`` keeps the whole cache and masks the evicted entries: it saves no
    memory. A plan whose heads happen to keep equally many entries takes the usual
    rectangular path.

    Scores of inner strategies that are not comparable across heads make the cross-head top
    arbitrary (``knorm``'s key norms have a different scale per head, ``random`` is random);
    they are allowed, as in kvpress. Inner strategies that evict while decoding (``h2o`` /
    ``tova`` with ``decode_eviction=True``) are refused: their per-step eviction keeps every
    head at one size. ``pyramid(adakv(snapkv))`` ("Ada-Pyramid") gives each layer its pyramid
    budget and shares it across the layer's heads; ``mixkv(adakv(snapkv))`` allocates with the
    SnapKV scores and fills each head's count by MixKV's mixed score.

    Attributes:
        inner: a scored strategy (default ``snapkv``) whose scores allocate and select.
        alpha: share of ``n_keep`` every head keeps by its own scores first (default 0.2, the
            official code's and kvpress's). ``1`` keeps ``n_keep`` per head (the inner
            strategy's own counts; its entries up to ties in its scores); ``0`` shares everything
            but the windows.

    """

    alpha: float = Field(default=0.2, ge=0.0, le=1.0, allow_inf_nan=False, description="Per-head floor, x n_keep.")

    @classmethod
    def check_inner(cls, inner: Compressor) -> None:
        """Refuse inners without scores, other budget owners, decode-time eviction and ``adakv(adakv(...))``."""
        super().check_inner(inner)
        if isinstance(inner, AdaKV):
            raise ValueError("adakv(adakv(...)) is meaningless: one adakv already shares each layer's budget")
        if not isinstance(inner, ScoredCompressor):
            hint = _outside_hint(inner)
            raise ValueError(
                "adakv needs an inner strategy that scores entries (a ScoredCompressor); "
                f"'{inner.name}' is not one{hint}"
            )
        refuse_budget_owner("adakv", inner)
        if inner.acts_while_decoding:
            raise ValueError(
                f"adakv gives the KV heads budgets of different sizes, but '{inner.name}' evicts while decoding to "
                "one size per head: use decode_eviction=False"
            )

    @property
    def plans_ragged_heads(self) -> bool:
        """True unless ``alpha`` is 1 (every head keeps ``n_keep`` by its own scores)."""
        return self.alpha < 1

    def head_counts(self, layer: LayerView, scores: Any, windows: list[int]) -> list[Any]:
        """Each row's ``[kv_heads]`` counts (:func:`~kvpress_mm.ops.head_budgets.adaptive_head_counts`)."""
        return [
            adaptive_head_counts(scores[b][:, layer.real_positions(b)], n, windows[b], int(self.alpha * n))
            for b, n in enumerate(layer.n_keep)
        ]

    def plan(self, layer: LayerView) -> CompressionPlan:
        """Counts per head from the inner scores, each head's window and top entries, then the inner's finish."""
        inner = self.inner
        assert isinstance(inner, ScoredCompressor)  # check_inner
        scores = check_scores(inner.score(layer), layer, type(inner).__name__)
        windows = [clamp_window(inner.protected_window(n), n) for n in layer.n_keep]
        counts = self.head_counts(layer, scores, windows)
        plan = select_head_counts(layer, layer.selection_scores(scores, windows), windows, counts)
        return inner.finish(layer, plan)


def _outside_hint(inner: Compressor) -> str:
    """``"; write X(adakv(...)) instead"`` when the wrapper ``inner`` would take ``adakv`` as its inner strategy."""
    if not isinstance(inner, Wrapper):
        return ""
    try:
        type(inner).check_inner(AdaKV())
    except ValueError:
        return f"; {inner.name} and adakv do not compose either way"
    return f"; write {inner.name}(adakv(...)) instead"


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``adakv``."""
    register("adakv", AdaKV)
