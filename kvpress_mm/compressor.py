"""The base classes of every strategy: :class:`Compressor` and :class:`ScoredCompressor`."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpress_mm.modality import Modality
from kvpress_mm.ops.budget import n_keep_for
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.selection import check_scores, select_top_with_window
from kvpress_mm.ops.views import DecodeView, LayerView
from kvpress_mm.registry import StrategyClass, get_strategy, strategy_name
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
        needs_accumulated_attention: class-level flag (not a config field). ``True`` declares
            that :meth:`plan` reads the all-query column sums
            (``layer.accumulated_attention()`` / ``accumulated_attention_per_head()``); the
            session then computes each layer's prefill attention itself, in query chunks that
            yield the attention output and the column sums from the same softmax, instead of
            the model's attention followed by a second pass over the prompt. It is only an
            optimisation: without it the sums are computed lazily on first use, with the same
            result. Built-in ``h2o`` and the LOOK-M strategies set it; plugins may too.

    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    needs_accumulated_attention: ClassVar[bool] = False

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

    def budgets(self, modality: torch.Tensor) -> tuple[int, ...]:
        """Each row's budget ``n_keep`` for a prefill whose modality map is ``modality`` (``[batch, seq]``).

        ``int(L * (1 - compression_ratio))``, at least 1, of each row's ``L`` real entries. The
        session calls it once per prefill; the views of every layer carry the result as
        ``layer.n_keep`` and the report as ``report.n_keep``. ``modality-budget`` overrides it
        (separate vision and text ratios).
        """
        lengths = (modality != Modality.PADDING).sum(-1).tolist()
        return tuple(n_keep_for(int(n), self.compression_ratio) for n in lengths)

    @property
    def defers_plans(self) -> bool:
        """True when the strategy plans all layers at once, after the prefill's last layer (``vl-cache``).

        The session then calls :meth:`observe` right after each layer's prefill attention (the
        layer keeps its full cache meanwhile, so the prefill's peak memory is that of an
        uncompressed prefill) and :meth:`plan_deferred` with every layer's view after the last
        decoder layer's attention; it applies all plans before the first decode step.
        """
        return False

    def observe(self, layer: LayerView) -> None:
        """Record what :meth:`plan_deferred` will need of ``layer`` (strategies that defer their plans).

        Store it in ``layer.state`` or ``layer.call_state``: after this call the session releases
        the view's prompt queries and statistics (:meth:`LayerView.drop_queries`).
        """

    def plan_deferred(self, layers: Sequence[LayerView]) -> list[CompressionPlan]:
        """The plans of ``layers`` (every compressed layer of the prefill, in layer order), after :meth:`observe`.

        The default plans each layer on its own (:meth:`plan`).
        """
        return [self.plan(layer) for layer in layers]

    @property
    def respects_budgets(self) -> bool:
        """True when :meth:`plan` keeps ``layer.n_keep`` entries per row and KV head (a budget wrapper may set them).

        LOOK-M with ``keep_all_text=True`` does not (it keeps every text entry): wrappers refuse it.
        """
        return True

    @property
    def allocates_budgets(self) -> bool:
        """True when the strategy decides per-layer or per-modality budgets itself (``pyramid``, ``vl-cache``).

        Such a strategy cannot be the inner strategy of a wrapper that allocates budgets too.
        """
        return False

    @property
    def prefill_chunk_size(self) -> int | None:
        """Positions per chunk when the session must feed each prefill in chunks (``chunked-prefill``).

        ``None`` (default): the prompt goes in one call. Otherwise the session splits the text
        decoder's prefill call into chunks of this many positions and plans every layer after
        each chunk on a :class:`~kvpress_mm.ops.cache_view.CacheView` (see
        the ``chunked-prefill`` wrapper's page).
        """
        return None

    @property
    def is_noop(self) -> bool:
        """True when the strategy never changes the cache (``compression_ratio == 0``)."""
        return self.compression_ratio == 0

    @property
    def acts_while_decoding(self) -> bool:
        """True when the class overrides :meth:`decode_plan`: the session then builds decode-time views."""
        return type(self).decode_plan is not Compressor.decode_plan

    @property
    def evicts_while_decoding(self) -> bool:
        """True when :meth:`decode_plan` may evict entries while decoding.

        Default: the strategy acts while decoding (:attr:`acts_while_decoding`: the class
        overrides :meth:`decode_plan`, or an option turns it on, like ``h2o``'s and ``tova``'s
        ``decode_eviction``; a wrapper follows its inner strategy) and is not a no-op. Two
        features refuse such a strategy before the first token:

        - assisted (speculative) decoding and ``cache.crop``: entries evicted after a decode step
          are chosen with the attention of tokens a caller may still take back (assisted decoding
          removes rejected drafts with ``cache.crop``, which cannot bring back what was evicted in
          their presence);
        - a quanto / HQQ ``QuantizedCache``: each eviction would re-quantize the whole cache.

        A plugin whose decode step only observes (never evicts) overrides this property.
        """
        return not self.is_noop and self.acts_while_decoding

    @property
    def plans_ragged_heads(self) -> bool:
        """True when plans may keep different numbers of entries per KV head (``adakv``).

        Such plans are stored as ragged layers (:class:`~kvpress_mm.cache.ragged.RaggedLayer`),
        which only a ``DynamicCache`` can become: other caches are refused before the prefill.
        """
        return False

    @property
    def decode_eviction_remedy(self) -> str:
        """How to build this strategy so that it does not evict while decoding (error messages quote it).

        Where decode-time eviction cannot work (assisted decoding, ``cache.crop``, a quanto / HQQ
        cache, ragged layers), the error ends with this sentence. Default: the conventional
        ``decode_eviction`` option where the strategy has one; a plugin with another switch
        overrides it.
        """
        if "decode_eviction" in type(self).model_fields:
            return (
                f"Build it with decode_eviction=False (Compressor.from_name({self.name!r}, ..., "
                "decode_eviction=False): it then evicts only at the prefill)"
            )
        return "Use a strategy that does not evict while decoding (evicts_while_decoding is False)"

    @property
    def name(self) -> str:
        """The name this strategy class is registered under."""
        return strategy_name(type(self))

    @classmethod
    def from_name(cls, name: str, **config: Any) -> Compressor:
        """Build the registered strategy ``name`` with ``config``.

        ``name`` is any name :func:`~kvpress_mm.list_strategies` returns, built-in or from a
        plugin; ``config`` holds the strategy's fields (every strategy has
        ``compression_ratio``). Omitted fields take their defaults.

        Raises:
            UnknownStrategyError: ``name`` is not registered; the message lists the available
                names and suggests close matches.
            pydantic.ValidationError: a config value is invalid; the message names the field.

        Examples:
            >>> Compressor.from_name("snapkv", compression_ratio=0.8, window_size=16)
            SnapKV(compression_ratio=0.8, window_size=16, kernel_size=7, pooling='max')
            >>> Compressor.from_name("h2o", compression_ratio=0.8)
            H2O(compression_ratio=0.8, window_size=None, decode_eviction=True)
            >>> Compressor.from_name("snapKV2")
            Traceback (most recent call last):
            kvpress_mm.errors.UnknownStrategyError: unknown strategy 'snapKV2'. Did you mean 'snapkv'? ...

        """
        return cast(Compressor, get_strategy(name)(**config))

    def to_config(self) -> dict[str, Any]:
        """A JSON-serialisable dict with the strategy name and its config.

        Examples:
            >>> Compressor.from_name("h2o", compression_ratio=0.8).to_config()
            {'strategy': 'h2o', 'compression_ratio': 0.8, 'window_size': None, 'decode_eviction': True}

        """
        return {"strategy": self.name, **self.model_dump(mode="json")}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Compressor:
        """Inverse of :meth:`to_config`: the strategy named by the ``"strategy"`` key, with the rest as config.

        Examples:
            >>> compressor = Compressor.from_name("snapkv", compression_ratio=0.8)
            >>> Compressor.from_config(compressor.to_config()) == compressor
            True

        """
        config = dict(config)
        name = config.pop("strategy", None)
        if not isinstance(name, str):
            raise ValueError("config has no 'strategy' field naming the strategy (see Compressor.to_config)")
        return cls.from_name(name, **config)

    def __call__(self, model: torch.nn.Module, *, growing_cache: bool = True) -> CompressionSession:
        """A context manager that compresses ``model``'s KV cache while it is active.

        Entering it finds the model's adapter (an error names the supported families if none
        claims the model) and installs the hooks; leaving it, also on an exception, removes them
        and leaves the model exactly as it was. Every ``generate`` or forward call made inside
        compresses its prompt's cache right after the prefill, layer by layer.

        Args:
            model: a transformers model (text-only decoder LM or a supported vision-language
                model) using ``sdpa`` or ``eager`` attention.
            growing_cache: move each compressed layer into a
                :class:`~kvpress_mm.cache.growing.GrowingLayer`, which appends decoded entries in
                place (transformers' ``DynamicLayer`` copies the whole cache at every decode
                step). ``False`` keeps ``DynamicLayer``; outputs are identical either way.

        Returns:
            A :class:`~kvpress_mm.CompressionSession`; its ``report`` describes the last
                prefill's compression.

        Examples:
            ```python
            compressor = Compressor.from_name("snapkv", compression_ratio=0.8)
            with compressor(model) as session:
                out = model.generate(**inputs, max_new_tokens=64)
            print(session.report.kv_bytes_before, session.report.kv_bytes_after)
            ```

        """
        return CompressionSession(self, model, growing_cache=growing_cache)


class ScoredCompressor(Compressor):
    """Base class of score-based strategies: implement :meth:`score`, the framework does the rest.

    Budgets, the protected window, padding, batches, cache surgery and decoding are handled
    by the framework: each row keeps its ``protected_window`` most recent entries plus the
    highest-scoring others, up to its budget ``int(L * (1 - compression_ratio))``. Selection
    is per KV head: each head keeps its own top entries. Config fields are pydantic fields.

    This is also the interface wrappers use (``pyramid``, ``modality-budget``, ``mixkv``): they
    choose budgets, rank entries by :meth:`score`, protect :meth:`protected_window`, and call
    :meth:`finish` on the kept set they chose.

    Examples:
        A complete strategy with a protected window, registered from a plugin module:

        ```python
        import torch
        from pydantic import Field

        from kvpress_mm import LayerView, ScoredCompressor, hookimpl


        class KeyNorm(ScoredCompressor):
            \"\"\"Keep the entries whose keys have the smallest L2 norm.\"\"\"

            window_size: int = Field(default=0, ge=0, description="Recent entries always kept.")

            def protected_window(self, n_keep: int) -> int:
                return self.window_size

            def score(self, layer: LayerView) -> torch.Tensor:
                return -layer.keys.float().norm(dim=-1)  # [batch, kv_heads, seq]


        @hookimpl
        def kvpress_mm_register_strategies(register):
            register("keynorm", KeyNorm)
        ```

    """

    @abstractmethod
    def score(self, layer: LayerView) -> torch.Tensor:
        """``[batch, kv_heads, seq]`` float scores, higher = keep. Padding positions are ignored.

        Args:
            layer: the layer right after its prefill attention: ``layer.keys`` /
                ``layer.values`` ``[batch, kv_heads, seq, head_dim]``, ``layer.modality``
                ``[batch, seq]``, budgets, and lazily computed attention statistics.

        Returns:
            One score per entry and KV head, compared within a row and KV head only, in
                float32 (return float32 or wider: bf16 scores collapse into ties).

        """

    def protected_window(self, n_keep: int) -> int:
        """Most recent entries always kept for a row with budget ``n_keep`` (default none).

        Override it to protect a window; a value larger than ``n_keep`` is clamped to it.
        """
        return 0

    def finish(self, layer: LayerView, plan: CompressionPlan) -> CompressionPlan:
        """A step after selection, on whichever kept set was chosen (default: ``plan`` unchanged).

        The LOOK-M merging strategies merge the evicted entries into the kept ones here, and
        ``h2o`` / ``tova`` record the kept entries' state for decode-time eviction, so that a
        wrapper that selects with other budgets still gets them.
        """
        return plan

    def plan(self, layer: LayerView) -> CompressionPlan:
        """Keep the protected window plus the top-scoring entries, then :meth:`finish`."""
        scores = check_scores(self.score(layer), layer, type(self).__name__)
        windows = [self.protected_window(n) for n in layer.n_keep]
        return self.finish(layer, select_top_with_window(layer, scores, windows))


# the registry accepts exactly Compressor subclasses as strategies (it sits below this module)
StrategyClass.register(Compressor)  # type: ignore[type-abstract]  # an abstract class is what it marks
