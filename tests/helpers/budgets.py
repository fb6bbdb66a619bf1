"""Budget checks shared by the end-to-end tests: uniform strategies and layer-adaptive ones (``vl-cache``)."""

from __future__ import annotations

from collections.abc import Sequence

from kvpress_mm.strategies import LAYER_ADAPTIVE_STRATEGIES


def assert_layer_budgets(name: str, kept: Sequence[int], n_keep: int, length: int) -> None:
    """``kept[l]`` entries per layer after the prefill: ``n_keep`` each, or (layer-adaptive) ``n_keep`` on average.

    A layer-adaptive strategy's layers keep between 1 and ``length`` entries and exactly
    ``len(kept) * n_keep`` in all.
    """
    if name in LAYER_ADAPTIVE_STRATEGIES:
        total = len(kept) * n_keep
        assert sum(kept) == total, f"{name}: layer budgets {list(kept)} do not sum to {total}"
        assert all(1 <= k <= length for k in kept), f"{name}: a layer budget outside [1, {length}]: {list(kept)}"
    else:
        assert list(kept) == [n_keep] * len(kept), f"{name}: layer budgets {list(kept)}, expected {n_keep} each"
