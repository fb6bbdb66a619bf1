"""One of two plugins that both register a strategy named ``twin``."""

from typing import Any

import torch

from kvpress_mm import ScoredCompressor, hookimpl


class TwinB(ScoredCompressor):
    """Twin B."""

    def score(self, layer: Any) -> torch.Tensor:
        return torch.zeros(layer.keys.shape[:3])


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    register("twin", TwinB)
