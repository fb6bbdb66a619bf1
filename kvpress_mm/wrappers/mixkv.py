"""``mixkv``: choose what fills each head's budget by importance, value norm and key diversity (MixKV).

Paper: Liu, Gui, Zhang, Zhang, "Mixing Importance with Diversity: Joint Optimization for KV Cache
Compression in Large Vision-Language Models", ICLR 2026, https://arxiv.org/abs/2510.20707
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kvpress_mm.compressor import Compressor, ScoredCompressor
from kvpress_mm.errors import InvalidPlanError
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.views import LayerView, SelectionTransform
from kvpress_mm.wrappers.base import Wrapper, innermost

#: Guards the min-max normalisations and rescalings against division by zero (the paper's code's).
EPS = 1e-8


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``x`` ``[H, n]``: ``(x - min) / (max - min + EPS)``."""
    low = x.amin(-1, keepdim=True)
    return (x - low) / (x.amax(-1, keepdim=True) - low + EPS)


def _to_mean(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per row of ``x`` ``[H, n]``: rescaled so that its mean is ``mean`` ``[H, 1]``."""
    return x * mean / (x.mean(-1, keepdim=True) + EPS)


def mixed_scores(layer: LayerView, scores: torch.Tensor, windows: Sequence[int]) -> torch.Tensor:
    """MixKV's score of every candidate entry (real, outside its row's window), per KV head; float32.

    With ``a`` the inner strategy's scores of the candidates ``C``, ``m`` their mean per head:
    ``s = r_h * dn + (1 - r_h) * (a + vn)``, where ``vn`` is the min-max normalised value norm
    ``||V_j||`` rescaled to mean ``m``, ``dn`` the min-max normalised key diversity
    ``-(k^_j . mu)`` rescaled to mean ``m`` (``k^`` the unit keys, ``mu`` their mean over all the
    row's real entries, window included), and ``r_h = clamp((L ||mu||^2 - 1) / (L - 1), 0, 1)``
    the head's redundancy (the mean cosine similarity of its keys over all pairs; 0 if
    ``L = 1``). Other entries keep their scores (they are not ranked).
    """
    out = scores.clone()
    for b in range(layer.batch_size):
        positions = layer.real_positions(b)
        length = int(positions.numel())
        candidates = positions[: length - windows[b]]
        if candidates.numel() == 0:
            continue
        importance = scores[b][:, candidates]  # [H, |C|]
        mean = importance.mean(-1, keepdim=True)
        value_norm = _to_mean(_min_max(layer.values[b][:, candidates].float().norm(dim=-1)), mean)
        unit_keys = F.normalize(layer.keys[b][:, positions].float(), dim=-1)  # [H, L, D]
        centre = unit_keys.mean(1)  # [H, D]
        similarity = (unit_keys[:, : candidates.numel()] * centre[:, None, :]).sum(-1)  # [H, |C|]
        diversity = _to_mean(_min_max(-similarity), mean)
        if length > 1:
            redundancy = ((length * centre.square().sum(-1) - 1) / (length - 1)).clamp(0, 1)[:, None]
        else:
            redundancy = torch.zeros_like(mean)
        out[b][:, candidates] = redundancy * diversity + (1 - redundancy) * (importance + value_norm)
    return out


class MixKV(Wrapper):
    """The inner strategy's budgets and windows, filled by MixKV's mixed importance-diversity score.

    The inner strategy decides everything but the ranking: each row's budget per layer and KV
    head (uniform for a plain strategy; per layer under ``pyramid`` / ``vl-cache``; per modality
    under ``modality-budget``), its protected window, and the scores ``a`` that its allocation
    uses. Every selection inside it then ranks the candidates (real entries outside the window)
    by :func:`mixed_scores` instead of ``a``: ``s = r_h * dn + (1 - r_h) * (a + vn)``. Heads
    whose keys are redundant (``r_h`` near 1) keep diverse entries; others keep important ones,
    with large values favoured. Totals, windows and merges (LOOK-M's :meth:`finish`) are the inner
    strategy's, so ``mixkv(pyramid(snapkv))`` and ``pyramid(mixkv(snapkv))`` are the same.

    Definition from the paper's official code (``headwisemixkv``), with one documented
    deviation: the released code reads each head's ``r_h`` from an offline table computed on
    Qwen2-VL (10 samples); the paper and this implementation compute it online per prompt
    (what the paper's ablation prefers; the table cannot index other models' heads). Keys are
    the cached post-RoPE ones, as in the paper's code. For the paper's setting use
    ``inner={"strategy": "snapkv", "window_size": 32, "kernel_size": 5, "pooling": "avg"}``.
    Computed in float32 per row and KV head.

    Attributes:
        inner: the strategy whose budgets and scores are used (default ``snapkv``): a scored
            strategy, or a budget wrapper around one.

    """

    @classmethod
    def check_inner(cls, inner: Compressor) -> None:
        """Refuse ``mixkv(mixkv(...))`` and inners that rank nothing (no scores)."""
        super().check_inner(inner)
        if isinstance(inner, MixKV):
            raise ValueError("mixkv(mixkv(...)) is meaningless: the mixed score would be mixed again")
        bottom = innermost(inner)
        if not isinstance(bottom, ScoredCompressor):
            raise ValueError(
                "mixkv needs an inner strategy that scores entries (a ScoredCompressor), or a wrapper around one; "
                f"'{bottom.name}' is not one"
            )

    @property
    def allocates_budgets(self) -> bool:
        """The inner strategy's (``mixkv`` changes rankings, not budgets)."""
        return self.inner.allocates_budgets

    @property
    def defers_plans(self) -> bool:
        """The inner strategy's."""
        return self.inner.defers_plans

    def budgets(self, modality: torch.Tensor) -> tuple[int, ...]:
        """The inner strategy's (it has the same ``compression_ratio``; ``modality-budget`` its own ratios)."""
        return self.inner.budgets(modality)

    @property
    def is_noop(self) -> bool:
        """The inner strategy's."""
        return self.inner.is_noop

    def _transform(self, used: list[bool]) -> SelectionTransform:
        def transform(layer: LayerView, scores: torch.Tensor, windows: Sequence[int]) -> torch.Tensor:
            used.append(True)
            return mixed_scores(layer, scores, windows)

        return transform

    def _check_used(self, used: list[bool]) -> None:
        if not used:
            raise InvalidPlanError(
                f"mixkv: the inner strategy {type(self.inner).__name__} chose its kept entries without the "
                "framework's selection (LayerView.selection_scores), so the mixed scores were not used"
            )

    def plan(self, layer: LayerView) -> CompressionPlan:
        """The inner strategy's plan, its selections ranking the mixed scores."""
        used: list[bool] = []
        plan = self.inner.plan(layer.with_selection(self._transform(used)))
        self._check_used(used)
        return plan

    def observe(self, layer: LayerView) -> None:
        """The inner strategy's (``vl-cache``)."""
        self.inner.observe(layer)

    def plan_deferred(self, layers: Sequence[LayerView]) -> list[CompressionPlan]:
        """The inner strategy's deferred plans, its selections ranking the mixed scores."""
        used: list[bool] = []
        transform = self._transform(used)
        plans = self.inner.plan_deferred([layer.with_selection(transform) for layer in layers])
        if layers:
            self._check_used(used)
        return plans


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``mixkv``."""
    register("mixkv", MixKV)
