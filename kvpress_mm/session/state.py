"""What the session keeps about a compressed cache, and how that state follows the cache's row changes.

A compressed cache's columns no longer line up with the 2-D attention mask generate keeps, so
the session remembers, per cache: which slots of each layer are real (:class:`LayerState`), each
row's budget and strategy state, the position each row continues at, and what the adapter
recorded about the prompt (:class:`CacheState`). The state is stored on the cache object itself
(:func:`attach_state` / :func:`state_of`): it lives exactly as long as the cache, and a copy of
the cache (``copy.deepcopy``, pickle) carries a copy of it, so a copied compressed cache
continues as compressed instead of silently decoding as an uncompressed one.

Beam search reorders the cache's rows between steps (``cache.reorder_cache``); the cache
instance's row methods are wrapped (:class:`FollowRows`) so that the per-row state follows.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

#: The attribute of a cache object that holds its :class:`CacheState`.
STATE_ATTRIBUTE = "_kvpress_mm_state"

#: The cache methods that change which rows a cache holds (beam search calls ``reorder_cache``).
ROW_METHODS = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave")


def select_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` with only rows ``rows`` (in that order) of its per-row parts.

    Per-row parts are tensors whose first dimension is the batch (``batch`` long), and lists
    and tuples of ``batch`` items; dicts are searched recursively. Anything else is shared by
    all rows and returned as it is. This is the convention for what a strategy keeps in
    ``LayerView.state`` and an adapter returns from ``ModelAdapter.record_prompt``.

    >>> select_rows({"scores": torch.tensor([1.0, 2.0]), "windows": [3, 4], "k": 5}, torch.tensor([1, 1]), 2)
    {'scores': tensor([2., 2.]), 'windows': [4, 4], 'k': 5}
    """
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, dict):
        return {key: select_rows(item, rows, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == batch:
        picked = [value[i] for i in rows.tolist()]
        return picked if isinstance(value, list) else tuple(picked)
    return value


@dataclass
class LayerState:
    """What the session keeps about one compressed layer of one cache."""

    length: int  # entries the layer holds
    slot_valid: torch.Tensor | None  # [B, length] bool, False for filler slots; None = all valid
    n_keep: tuple[int, ...]
    strategy_state: dict[str, Any]
    # [B, kv_heads, n] int8: the modality of the first n slots, per KV head; later slots were
    # appended since (TEXT, PADDING where invalid). See kvpress_mm.session.slots.
    slot_modality: torch.Tensor | None = None

    def set_slots(self, slot_valid: torch.Tensor) -> None:
        """Record the layer's slots after a change (``None`` when all are valid: the fast path)."""
        self.length = int(slot_valid.shape[-1])
        self.slot_valid = None if bool(slot_valid.all()) else slot_valid

    def cached_valid(self, batch: int, device: torch.device) -> torch.Tensor:
        """``[batch, length]`` bool: which of the layer's slots are real."""
        if self.slot_valid is not None:
            return self.slot_valid.to(device)
        return torch.ones(batch, self.length, dtype=torch.bool, device=device)

    def select_rows(self, rows: torch.Tensor, batch: int) -> None:
        """Keep rows ``rows`` of ``batch`` (in that order), as the cache just did."""
        if self.slot_valid is not None:
            self.slot_valid = self.slot_valid.index_select(0, rows.to(self.slot_valid.device))
        if self.slot_modality is not None:
            self.slot_modality = self.slot_modality.index_select(0, rows.to(self.slot_modality.device))
        self.n_keep = tuple(self.n_keep[i] for i in rows.tolist())
        selected = select_rows(self.strategy_state, rows, batch)
        self.strategy_state.clear()  # in place: the dict is the strategy's, views share it
        self.strategy_state.update(selected)


@dataclass
class CacheState:
    """What the session keeps about a cache it compressed (lives on the cache, as long as it)."""

    seen_columns: int  # columns of the 2-D attention mask consumed so far (prompt + decoded)
    layers: dict[int, LayerState] = field(default_factory=dict)
    # [B] long: each row's real tokens so far, i.e. the position its next token must have
    next_positions: torch.Tensor | None = None
    # what the adapter recorded about the prompt (ModelAdapter.record_prompt)
    prompt_record: dict[str, Any] = field(default_factory=dict)
    # True while one of the cache's ROW_METHODS runs (one calling another is followed once)
    changing_rows: bool = False

    def rows_for(self, method: str, argument: Any) -> tuple[torch.Tensor, int] | None:
        """The rows (of the batch size before the call) the cache keeps after ``cache.<method>(argument)``."""
        if self.next_positions is None:
            return None
        batch = int(self.next_positions.shape[0])
        if method == "batch_repeat_interleave":
            return torch.arange(batch).repeat_interleave(int(argument)), batch
        rows = torch.as_tensor(argument)
        if rows.dtype == torch.bool:
            rows = rows.nonzero().flatten()
        rows = rows.long().flatten().cpu()
        return torch.where(rows < 0, rows + batch, rows), batch

    def select_rows(self, rows: torch.Tensor, batch: int) -> None:
        """Keep rows ``rows`` of every per-row tensor, as the cache just did (beam search's reordering)."""
        if self.next_positions is not None:
            self.next_positions = self.next_positions.index_select(0, rows.to(self.next_positions.device))
        self.prompt_record = select_rows(self.prompt_record, rows, batch)
        for layer_state in self.layers.values():
            layer_state.select_rows(rows, batch)


def state_of(cache: Any) -> CacheState | None:
    """The session's state of a compressed ``cache`` (``None`` for a cache it never compressed)."""
    if cache is None:
        return None
    state = vars(cache).get(STATE_ATTRIBUTE) if hasattr(cache, "__dict__") else None
    return state if isinstance(state, CacheState) else None


def attach_state(cache: Any, state: CacheState) -> None:
    """Store ``state`` on ``cache`` and make the cache's row methods carry it along (once)."""
    setattr(cache, STATE_ATTRIBUTE, state)
    for name in ROW_METHODS:
        if not callable(getattr(type(cache), name, None)):
            continue
        previous = vars(cache).get(name)
        if isinstance(previous, FollowRows):
            continue
        setattr(cache, name, FollowRows(cache, name, previous))


class FollowRows:
    """Stands in for one of a compressed cache's :data:`ROW_METHODS` (on that cache instance only).

    Calls the cache's own method, then selects the same rows of everything the session keeps
    about the cache (slot masks, strategy state such as ``h2o``'s scores, next positions, the
    adapter's prompt record), so that per-row state stays with its row when beam search
    reorders the beams. The cache's class and the model are left untouched.
    """

    def __init__(self, cache: Any, name: str, previous: Callable[..., Any] | None = None) -> None:
        self._cache = weakref.ref(cache)  # the cache holds this object: no reference cycle
        self._name = name
        self._previous = previous  # an instance attribute that was there before, if any

    def __call__(self, argument: Any) -> Any:
        """Call the cache's own method, then select the same rows of the session's state."""
        cache = self._cache()
        if cache is None:  # pragma: no cover - the cache owns this object
            raise ReferenceError("the cache this method belongs to no longer exists")
        state = state_of(cache)
        nested = state is not None and state.changing_rows
        rows = None if state is None or nested else state.rows_for(self._name, argument)
        if state is not None:
            state.changing_rows = True
        try:
            if self._previous is not None:
                result = self._previous(argument)
            else:
                result = getattr(type(cache), self._name)(cache, argument)
        finally:
            if state is not None and not nested:
                state.changing_rows = False
        if state is not None and rows is not None:
            state.select_rows(*rows)
        return result

    def __reduce__(self) -> tuple[Any, ...]:
        # a copy of the cache (copy.deepcopy, pickle) gets a stand-in bound to the copy; the
        # session's state travels in the cache's own attributes
        return (FollowRows, (self._cache(), self._name, self._previous))
