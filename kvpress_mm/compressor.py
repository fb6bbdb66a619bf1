"""The base classes of every strategy: :class:`Compressor` and :class:`ScoredCompressor`."""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpress_mm.layer import DecodeView, LayerView
from kvpress_mm.plan import CompressionPlan
from kvpress_mm.selection import check_scores, select_top_with_window

if TYPE_CHECKING:
    from kvpress_mm.session import CompressionSession


class Compressor(BaseModel):
    """Base class of every KV-cache compression strategy.

    A strategy is a validated, immutable config (a pydantic model) plus the tensor code that
    turns one layer's prompt keys, values and attention into a :class:`CompressionPlan`.
    Calling it on a model gives a context manager that compresses the cache of every
    ``generate`` / forward call made inside it:

    ```python
    from kvpress_mm import Compressor

    compressor = Compressor.from_name("lookm-pivotal", compression_ratio=0.8)
    with compressor(model):
        out = model.generate(**inputs, max_new_tokens=64)
    ```

    Attributes:
        compression_ratio: fraction of the prompt's cache entries removed, ``0 <= r < 1``.
            Each row keeps ``int(L * (1 - r))`` (at least 1) of its ``L`` prompt entries, per
            layer and KV head. ``0`` leaves cache and output bit-identical.

    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    compression_ratio: float = Field(
        default=0.5, ge=0.0, lt=1.0, allow_inf_nan=False, description="Fraction of prompt entries removed."
    )

    def __str__(self) -> str:
        return repr(self)

    @abstractmethod
    def plan(self, layer: LayerView) -> CompressionPlan:
        """Decide which entries of ``layer`` each KV head keeps (and how evicted ones merge)."""

    def decode_plan(self, layer: DecodeView) -> CompressionPlan | None:
        """Optionally evict entries after a decode step (``h2o``). ``None`` keeps the cache as is."""
        return None

    @property
    def is_noop(self) -> bool:
        """True when the strategy never changes the cache (``compression_ratio == 0``)."""
        return self.compression_ratio == 0

    @property
    def name(self) -> str:
        """The name this strategy class is registered under."""
        from kvpress_mm.registry import strategy_name

        return strategy_name(type(self))

    @classmethod
    def from_name(cls, name: str, **config: Any) -> Compressor:
        """Build the registered strategy ``name`` with ``config``.

        Raises:
            UnknownStrategyError: ``name`` is not registered; the message lists the available
                names and suggests close matches.
            pydantic.ValidationError: a config value is invalid; the message names the field.

        >>> Compressor.from_name("snapkv", compression_ratio=0.8, window_size=16)
        SnapKV(compression_ratio=0.8, window_size=16, kernel_size=7, pooling='max')

        """
        from kvpress_mm.registry import get_strategy

        return get_strategy(name)(**config)

    def to_config(self) -> dict[str, Any]:
        """A JSON-serialisable dict with the strategy name and its config."""
        return {"strategy": self.name, **self.model_dump(mode="json")}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Compressor:
        """Inverse of :meth:`to_config`."""
        config = dict(config)
        name = config.pop("strategy", None)
        if not isinstance(name, str):
            raise ValueError("config has no 'strategy' field naming the strategy (see Compressor.to_config)")
        return cls.from_name(name, **config)

    def __call__(self, model: torch.nn.Module) -> CompressionSession:
        """A context manager that compresses ``model``'s KV cache while it is active."""
        from kvpress_mm.session import CompressionSession

        return CompressionSession(self, model)


class ScoredCompressor(Compressor):
    """Base class of score-based strategies: implement :meth:`score`, the framework does the rest.

    Budgets, the protected window, padding, batches, cache surgery and decoding are handled
    by the framework: each row keeps its ``protected_window`` most recent entries plus the
    highest-scoring others, up to its budget.

    ```python
    class KeyNorm(ScoredCompressor):
        \"\"\"Keep the entries whose keys have the smallest norm.\"\"\"
        def score(self, layer):
            return -layer.keys.float().norm(dim=-1)
    ```
    """

    @abstractmethod
    def score(self, layer: LayerView) -> torch.Tensor:
        """``[batch, kv_heads, seq]`` float scores, higher = keep. Padding positions are ignored."""

    def protected_window(self, n_keep: int) -> int:
        """Most recent entries always kept for a row with budget ``n_keep`` (default none)."""
        return 0

    def plan(self, layer: LayerView) -> CompressionPlan:
        """Keep the protected window plus the top-scoring entries."""
        scores = check_scores(self.score(layer), layer, type(self).__name__)
        windows = [self.protected_window(n) for n in layer.n_keep]
        return select_top_with_window(layer, scores, windows)
