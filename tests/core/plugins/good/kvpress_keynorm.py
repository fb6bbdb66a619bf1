"""A well-behaved third-party plugin: the ``keynorm`` strategy of the architecture docs."""

from typing import Any

import torch

from kvpress_mm import ScoredCompressor, hookimpl


class KeyNorm(ScoredCompressor):
    """Keep the entries whose keys have the smallest norm."""

    def score(self, layer: Any) -> torch.Tensor:
        return -layer.keys.float().norm(dim=-1)


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    register("keynorm", KeyNorm)
