"""``decoding``: re-apply the inner strategy while decoding, so that no layer ever holds more than ``max_entries``.

The idea is kvpress's ``DecodingPress`` (re-compress the whole cache periodically during a long
generation, with queries of recent steps); the definition is the project's (STRATEGIES.md,
"Second wave"), and the differences are listed in :class:`Decoding`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from kvpress_mm.compressor import Compressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.cache_view import decode_cache_view, forget_decode_queries, remember_decode_queries
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.views import DecodeView, LayerView
from kvpress_mm.wrappers.base import Wrapper, chain, innermost

#: Where the layer's recent decode queries wait for the next re-plan (in the layer's state).
_QUERIES = "decoding_queries"


class Decoding(Wrapper):
    """Bounds every compressed layer to ``max_entries`` for the whole generation by re-planning it with its inner.

    **The invariant.** Every compressed layer holds at most ``max_entries`` entries at every
    moment of a generation that adds one token per call (``generate``'s decode steps), the
    entry a step attends to included: whenever a layer holds ``max_entries`` entries or more
    after a call (the prefill included), the inner strategy compresses it to
    ``target = max_entries - interval``. So:

    - **prefill**: each row keeps the inner's budget ``n_keep = int(L * (1 - compression_ratio))``
      of its prompt if that is below ``max_entries``, else ``target`` (the prompt's own budget never
      lets a layer start at or above the bound);
    - **decoding**: each step appends one entry; after the step on which a layer reaches
      ``max_entries``, the layer is re-planned down to ``target``. In steady state this happens
      every ``interval`` steps (``target + interval = max_entries``), and the step attends to at
      most ``max_entries`` entries. A call that brings ``q > 1`` tokens at once (a second turn, an
      assistant's candidates) momentarily holds up to ``max_entries - 1 + q``, and is re-planned
      right after it.

    **What the inner strategy sees at a re-plan** (a :class:`~kvpress_mm.ops.cache_view.CacheView`):
    the layer's whole current cache (prompt entries still kept and decoded entries; filler slots
    of shorter rows marked padding; modality per KV head, decoded entries ``TEXT``), budget
    ``target`` for every row (a row holding fewer real entries keeps them all), and as queries
    the post-RoPE queries of the last ``min(interval, steps since the last re-plan)`` decode
    steps, stored exactly as the steps computed them, placed at their own entries (the last
    slots): each sees what it saw when it ran. So a windowed inner scores with the recent steps'
    attention (``snapkv`` with ``window_size`` larger than the buffer uses all of it),
    accumulated-attention inners (``h2o``, LOOK-M) sum the buffered queries' attention only,
    ``tova`` uses the last step's query, ``knorm`` / ``streaming`` / ``random`` use none.
    Kept entries keep their positions (their RoPE is never changed).

    **Differences from kvpress's DecodingPress**: kvpress rebuilds queries from buffered hidden
    states with the current step's RoPE for all of them (ours are the exact post-RoPE queries),
    compresses to ``target_size`` after every ``compression_interval``-th step so the cache
    oscillates up to ``target_size + compression_interval - 1`` (ours never exceeds
    ``max_entries``), keeps a hidden-state buffer independent of the interval (ours: the last
    ``interval`` steps' queries), and does nothing at prefill (its ``PrefillDecodingPress``
    combines a prefill press; here the prompt is compressed by the same inner strategy).

    **Inner strategies**: any strategy that keeps the budget it is given (a scored one, LOOK-M,
    ``random``, ``mixkv(...)``, ``chunked-prefill(...)``, plugins). Refused: strategies that
    evict while decoding themselves (``h2o`` / ``tova`` with ``decode_eviction=True``: they
    already hold each layer at its prefill size, and their per-step scores would not follow the
    re-plans: use ``decode_eviction=False``), strategies that allocate per-layer or per-modality
    budgets (``pyramid``, ``modality-budget``, ``vl-cache``: the bound is the same for every
    layer), and ``decoding(decoding(...))``.

    ``compression_ratio`` (the prompt's budget) is the wrapper's, as for every wrapper; with 0 the
    wrapper does nothing at all (the cache and output are exactly transformers').

    Attributes:
        max_entries: the most entries a compressed layer holds (default 2048, kvpress's ``target_size``).
        interval: decode steps between two re-plans in steady state, and the number of recent
            decode queries the inner strategy sees (default 64); ``interval < max_entries``.

    Examples:
        >>> Compressor.from_name("decoding", inner="snapkv", max_entries=512, interval=64).target
        448

    """

    max_entries: int = Field(default=2048, ge=2, description="The most entries a compressed layer holds.")
    interval: int = Field(default=64, ge=1, description="Decode steps between re-plans; recent queries seen.")

    @model_validator(mode="after")
    def _interval_below_bound(self) -> Decoding:
        if self.interval >= self.max_entries:
            raise ValueError(
                f"decoding: interval ({self.interval}) must be smaller than max_entries ({self.max_entries}): each "
                "re-plan compresses a layer to max_entries - interval entries"
            )
        return self

    @classmethod
    def check_inner(cls, inner: Compressor) -> None:
        """Refuse inner strategies that evict while decoding, allocate budgets, or bound decoding themselves."""
        super().check_inner(inner)
        if isinstance(inner, Decoding):
            raise ValueError("decoding(decoding(...)) is meaningless: one bound already holds every layer")
        evicting = innermost(inner)
        if inner.acts_while_decoding and getattr(evicting, "decode_eviction", True):
            raise ValueError(
                f"decoding cannot wrap '{evicting.name}' with decode-time eviction: it already holds every layer at "
                "its prefill size while decoding, and its per-step scores would not follow decoding's re-plans. Use "
                f"'{evicting.name}' with decode_eviction=False"
            )
        if any(strategy.name == "adakv" for strategy in chain(inner)):
            raise ValueError(
                "decoding cannot wrap adakv: adakv stores each layer's KV heads at different lengths (ragged), and "
                "decoding's re-plans evict every head to one size. Use decoding around the scored strategy alone "
                "(decoding(snapkv) ...), or adakv without decoding"
            )
        if inner.allocates_budgets or inner.defers_plans:
            raise ValueError(
                f"decoding bounds every layer at the same max_entries; its inner strategy '{inner.name}' allocates "
                "per-layer or per-modality budgets itself (pyramid, modality-budget, vl-cache). Use decoding around "
                "a strategy that keeps the budget it is given (snapkv, h2o, tova, knorm, LOOK-M, ...)"
            )

    @property
    def target(self) -> int:
        """What a re-plan leaves: ``max_entries - interval`` entries per row."""
        return self.max_entries - self.interval

    def budgets(self, modality: Any) -> tuple[int, ...]:
        """The inner's budgets of the prompt, except that a budget of ``max_entries`` or more becomes ``target``."""
        return tuple(n if n < self.max_entries else self.target for n in self.inner.budgets(modality))

    def plan(self, layer: LayerView) -> CompressionPlan:
        """The prompt's plan: the inner strategy's, with the budgets of :meth:`budgets`."""
        return self.inner.plan(layer)

    @property
    def acts_while_decoding(self) -> bool:
        """True: every step's queries are buffered, and a layer that reaches ``max_entries`` is re-planned."""
        return True

    @property
    def decode_eviction_remedy(self) -> str:
        """Bounding the cache while decoding is what this wrapper is for: the remedy is going without it."""
        return (
            f"Use the inner strategy without the decoding wrapper (Compressor.from_name({self.inner.name!r}, ...): "
            "it compresses at the prefill only), or a DynamicCache"
        )

    def decode_plan(self, layer: DecodeView) -> CompressionPlan | None:
        """Buffer the step's queries; re-plan the whole layer down to ``target`` once it holds ``max_entries``."""
        queries = remember_decode_queries(layer, self.interval, _QUERIES)
        if int(layer.keys.shape[2]) < self.max_entries:
            return None
        view = decode_cache_view(layer, queries, (self.target,) * layer.batch_size)
        plan = self.inner.plan(view)
        forget_decode_queries(layer.state, plan.n_slots, _QUERIES)
        return plan


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``decoding``."""
    register("decoding", Decoding)
