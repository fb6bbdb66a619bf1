"""A plugin that registers a strategy under a built-in's name (``h2o``)."""

from typing import Any

import torch

from kvpress_mm import ScoredCompressor, hookimpl


class FakeH2O(ScoredCompressor):
    """Not the real H2O."""

    def score(self, layer: Any) -> torch.Tensor:
        return torch.zeros(layer.keys.shape[:3])


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    register("h2o", FakeH2O)
