"""The base of wrapper strategies: a strategy that takes an inner strategy and gives it budgets or scores.

A wrapper is a :class:`~kvpress_mm.Compressor` with an ``inner`` field, given as a registered
name, a config dict in :meth:`~kvpress_mm.Compressor.to_config` form or a strategy object:

```python
Compressor.from_name("pyramid", inner="snapkv", compression_ratio=0.8)
Compressor.from_name("pyramid", inner={"strategy": "snapkv", "window_size": 16})
Compressor.from_name("mixkv", inner=Compressor.from_name("pyramid", inner="h2o"))
```

The wrapper owns the budget: each row's ``n_keep`` comes from the outermost strategy's
``compression_ratio`` (``modality-budget``: its own ratios), and the inner strategy gets its
budgets through the :class:`~kvpress_mm.LayerView` it is handed. The inner strategy is stored
with the wrapper's ratio; an inner that sets another ratio explicitly is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

from pydantic import Field, ValidationInfo, field_serializer, field_validator

from kvpress_mm.compressor import Compressor, ScoredCompressor
from kvpress_mm.ops.budget import clamp_window
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.views import DecodeView
from kvpress_mm.registry import strategy_name

#: The inner strategy of a wrapper built without one.
DEFAULT_INNER = "snapkv"


def build_inner(value: Any) -> Compressor:
    """A strategy from a registered name, a :meth:`~kvpress_mm.Compressor.to_config` dict, or a strategy."""
    if isinstance(value, Compressor):
        return value
    if isinstance(value, str):
        return Compressor.from_name(value)
    if isinstance(value, dict):
        return Compressor.from_config(value)
    raise ValueError(
        "the inner strategy must be a registered name ('snapkv'), a config dict "
        f"({{'strategy': 'snapkv', 'window_size': 16}}) or a Compressor, got {type(value).__name__}"
    )


def chain(strategy: Compressor) -> list[Compressor]:
    """``strategy`` and the inner strategies of its wrappers, outermost first."""
    strategies = [strategy]
    while isinstance(strategies[-1], Wrapper):
        strategies.append(strategies[-1].inner)
    return strategies


def innermost(strategy: Compressor) -> Compressor:
    """The strategy at the bottom of a chain of wrappers."""
    while isinstance(strategy, Wrapper):
        strategy = strategy.inner
    return strategy


def protected_window_of(strategy: Compressor, n_keep: int) -> int:
    """The window the innermost strategy protects for a budget of ``n_keep`` (0 for unscored ones), clamped."""
    bottom = innermost(strategy)
    window = bottom.protected_window(n_keep) if isinstance(bottom, ScoredCompressor) else 0
    return clamp_window(window, n_keep)


def _explicit_ratios(strategy: Compressor) -> Iterator[tuple[str, float]]:
    """``(name, ratio)`` of every strategy of the chain whose config sets ``compression_ratio`` explicitly."""
    if "compression_ratio" in strategy.model_fields_set:
        yield strategy.name, strategy.compression_ratio
    if isinstance(strategy, Wrapper):
        yield from _explicit_ratios(strategy.inner)


def with_ratio(strategy: Compressor, ratio: float) -> Compressor:
    """``strategy`` (and its inner ones) with ``compression_ratio = ratio``; what was set explicitly stays marked so."""
    update: dict[str, Any] = {"compression_ratio": ratio}
    if isinstance(strategy, Wrapper):
        update["inner"] = with_ratio(strategy.inner, ratio)
    copy = strategy.model_copy(update=update)
    object.__setattr__(copy, "__pydantic_fields_set__", set(strategy.model_fields_set))
    return copy


class Wrapper(Compressor):
    """Base class of wrapper strategies: ``inner`` is the strategy the wrapper gives budgets or scores to.

    Subclasses implement ``plan`` (usually by handing the inner strategy a view with other
    budgets, :meth:`LayerView.with_budgets <kvpress_mm.LayerView.with_budgets>`) and
    :meth:`check_inner`, which refuses the inner strategies the wrapper cannot use, with a
    message that says why. What the session asks of a strategy (attention statistics,
    decode-time eviction, deferred plans) is the inner strategy's unless the wrapper says otherwise.

    Attributes:
        inner: the wrapped strategy (default ``snapkv``), built through the registry from a
            name or a config dict; plugins' strategies work too. It serialises as its own
            :meth:`~kvpress_mm.Compressor.to_config` dict.

    """

    # the default is a name, built like any given value (validate_default): it shows as "snapkv"
    inner: Compressor = Field(
        default=cast(Any, DEFAULT_INNER), description="The wrapped strategy (name, config dict or object)."
    )

    @field_validator("inner", mode="before")
    @classmethod
    def _build_inner(cls, value: Any) -> Compressor:
        return build_inner(value)

    @field_validator("inner", mode="after")
    @classmethod
    def _own_the_budget(cls, inner: Compressor, info: ValidationInfo) -> Compressor:
        cls.check_inner(inner)
        ratio = info.data.get("compression_ratio")
        if ratio is None:  # compression_ratio itself failed validation: that error is reported
            return inner
        wrapper = get_strategy_name(cls)
        for name, explicit in _explicit_ratios(inner):
            if explicit != ratio:
                raise ValueError(
                    f"the wrapper owns the budget: the inner strategy '{name}' sets compression_ratio={explicit}, "
                    f"but {wrapper} has compression_ratio={ratio}. Set compression_ratio on '{wrapper}' (the "
                    "outermost strategy) and leave it out of the inner strategy's config"
                )
        return with_ratio(inner, ratio)

    @field_serializer("inner")
    def _dump_inner(self, inner: Compressor) -> dict[str, Any]:
        return inner.to_config()

    @classmethod
    def check_inner(cls, inner: Compressor) -> None:
        """Raise ``ValueError`` (naming the problem) if ``inner`` cannot be this wrapper's inner strategy.

        The base refuses inner strategies that ignore budgets (LOOK-M with ``keep_all_text``).
        """
        if not inner.respects_budgets:
            raise ValueError(
                f"{get_strategy_name(cls)} needs an inner strategy that keeps the budget it is given; "
                f"{inner!r} does not (LOOK-M's keep_all_text=True keeps every text entry): use keep_all_text=False"
            )

    @property
    def needs_accumulated_attention(self) -> bool:  # type: ignore[override]  # a ClassVar on plain strategies
        """The inner strategy's (so that the session's fused prefill attention still applies)."""
        return bool(self.inner.needs_accumulated_attention)

    @property
    def is_noop(self) -> bool:
        """True when the ratio is 0 or the inner strategy never changes the cache (``full``)."""
        return self.compression_ratio == 0 or self.inner.is_noop

    @property
    def plans_ragged_heads(self) -> bool:
        """The inner strategy's (``pyramid(adakv(...))`` keeps ragged heads)."""
        return self.inner.plans_ragged_heads

    @property
    def decode_eviction_remedy(self) -> str:
        """The inner strategy's, which is the one evicting while decoding."""
        return f"For its inner strategy: {self.inner.decode_eviction_remedy}"

    @property
    def acts_while_decoding(self) -> bool:
        """The inner strategy's (``h2o`` evicts while decoding, within the budget the wrapper gave each layer)."""
        return self.inner.acts_while_decoding

    def decode_plan(self, layer: DecodeView) -> CompressionPlan | None:
        """The inner strategy's decode-time eviction."""
        return self.inner.decode_plan(layer)

    @property
    def respects_budgets(self) -> bool:
        """The inner strategy's."""
        return self.inner.respects_budgets

    @property
    def prefill_chunk_size(self) -> int | None:
        """The inner strategy's (``decoding(chunked-prefill(...))`` still chunks its prefills)."""
        return self.inner.prefill_chunk_size


def get_strategy_name(cls: type) -> str:
    """The registered name of wrapper class ``cls`` (its class name before registration)."""
    return strategy_name(cls)


def refuse_budget_owner(wrapper: str, inner: Compressor) -> None:
    """Refuse an inner strategy that allocates budgets itself or defers its plans (budget wrappers call it)."""
    if inner.allocates_budgets:
        raise ValueError(
            f"{wrapper} allocates budgets, and so does its inner strategy '{inner.name}': {wrapper}({inner.name}) "
            f"has two owners for one budget. Use '{inner.name}' alone, or {wrapper} around a strategy that "
            "keeps the budget it is given (snapkv, h2o, tova, ...)"
        )
    if inner.defers_plans:
        raise ValueError(
            f"{wrapper} plans each layer right after its attention; its inner strategy '{inner.name}' plans all "
            "layers at the end of the prefill"
        )
