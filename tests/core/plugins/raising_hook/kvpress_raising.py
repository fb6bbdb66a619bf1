"""A plugin whose hook registers one strategy and then raises: nothing of it may be kept."""

from typing import Any

import torch

from kvpress_mm import ScoredCompressor, hookimpl


class HalfRegistered(ScoredCompressor):
    """Registered just before the hook raises."""

    def score(self, layer: Any) -> torch.Tensor:
        return torch.zeros(layer.keys.shape[:3])


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    register("half-registered", HalfRegistered)
    raise RuntimeError("kvpress_raising exploded while registering")
