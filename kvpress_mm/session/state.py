"""What the session keeps about a compressed cache, and how that state follows the cache's row changes.

A compressed cache's columns no longer line up with the 2-D attention mask generate keeps, so
the session remembers, per cache: which slots of each layer are real (:class:`LayerState`), each
row's budget and strategy state, the position each row continues at, and what the adapter
recorded about the prompt (:class:`CacheState`). The state is stored on the cache object itself
(:func:`attach_state` / :func:`state_of`): it lives exactly as long as the cache, and a copy of
the cache (``copy.deepcopy``, pickle) carries a copy of it, so a copied compressed cache
continues as compressed instead of silently decoding as an uncompressed one.

generate edits a cache between steps: beam search reorders its rows (``cache.reorder_cache``),
assisted decoding removes the rejected draft tokens (``cache.crop``). The cache instance's methods
that do so are wrapped (:class:`FollowRows`, :class:`FollowCrop`) so that the session's state
follows the edit.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpress_mm.cache.quantized import check_row_method
from kvpress_mm.errors import InvalidInputError

#: The attribute of a cache object that holds its :class:`CacheState`.
STATE_ATTRIBUTE = "_kvpress_mm_state"

#: The cache methods that change which rows a cache holds (beam search calls ``reorder_cache``).
ROW_METHODS = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave")
#: The cache method that removes the last entries (assisted decoding drops rejected drafts with it).
CROP_METHOD = "crop"


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

    def drop_last(self, count: int) -> None:
        """Forget the layer's last ``count`` slots, as ``cache.crop(-count)`` just removed them."""
        self.length -= count
        if self.slot_valid is not None:
            self.set_slots(self.slot_valid[:, : self.length])

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
    # columns of the compressed prompt: entries before them were evicted, so a crop must not reach them
    prompt_columns: int = 0
    # why the cache cannot be cropped (its strategy evicts while decoding), or None (rollback_refusal)
    crop_refusal: str | None = None
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

    def check_crop(self, count: int) -> None:
        """Raise unless the last ``count`` entries of every compressed layer can be removed exactly.

        Raises:
            InvalidInputError: the crop would reach into the compressed prompt, or the cache's
                strategy evicts entries while decoding.

        """
        if count <= 0:
            return
        if self.crop_refusal is not None:
            raise InvalidInputError(f"cannot crop this compressed cache: {self.crop_refusal}")
        decoded = self.seen_columns - self.prompt_columns
        if count > decoded:
            raise InvalidInputError(
                f"crop(-{count}) would reach into the compressed prompt: this cache holds {decoded} entries "
                "after its prompt, and the prompt's evicted entries cannot be restored. Crop at most the tokens "
                "added after the prompt, or prefill the prompt again"
            )

    def drop_last(self, count: int) -> None:
        """Forget the last ``count`` columns, as ``cache.crop(-count)`` just removed them (see :meth:`check_crop`)."""
        if count <= 0:
            return
        if self.next_positions is not None:
            # each row's real tokens among the removed columns (every compressed layer agrees on its tail)
            tails = [ls.slot_valid[:, -count:] for ls in self.layers.values() if ls.slot_valid is not None]
            if tails:
                real = tails[0].sum(-1).to(self.next_positions.device, self.next_positions.dtype)
            else:
                real = torch.full_like(self.next_positions, count)
            self.next_positions = self.next_positions - real
        self.seen_columns -= count
        for layer_state in self.layers.values():
            layer_state.drop_last(count)

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


def rollback_refusal(strategy: Any) -> str | None:
    """Why caches of ``strategy`` cannot be rolled back (``cache.crop``), or ``None`` when they can.

    A strategy whose decode step evicts entries (``evicts_while_decoding``) chose them with the
    attention of tokens a crop would take back; the message ends with the strategy's
    ``decode_eviction_remedy``.
    """
    if not getattr(strategy, "evicts_while_decoding", False):
        return None
    fix = getattr(strategy, "decode_eviction_remedy", "Use a strategy that does not evict while decoding")
    return (
        f"{strategy!r} evicts cache entries while decoding, chosen with the attention of the newest tokens; "
        f"removing tokens again (assisted decoding's rollback of rejected drafts, cache.crop) cannot bring those "
        f"entries back. {fix}"
    )


def attach_state(cache: Any, state: CacheState) -> None:
    """Store ``state`` on ``cache`` and make the cache's row methods and ``crop`` carry it along (once)."""
    setattr(cache, STATE_ATTRIBUTE, state)
    for name in (*ROW_METHODS, CROP_METHOD):
        if not callable(getattr(type(cache), name, None)):
            continue
        previous = vars(cache).get(name)
        if isinstance(previous, FollowEdit):
            continue
        stand_in = FollowCrop if name == CROP_METHOD else FollowRows
        setattr(cache, name, stand_in(cache, name, previous))


class FollowEdit:
    """Stands in for one of a compressed cache's methods that edit it (on that cache instance only).

    Subclasses call the cache's own method and make the session's state follow the edit. The
    cache's class and the model are left untouched; a copy of the cache (``copy.deepcopy``,
    pickle) gets a stand-in bound to the copy.
    """

    def __init__(self, cache: Any, name: str, previous: Callable[..., Any] | None = None) -> None:
        self._cache = weakref.ref(cache)  # the cache holds this object: no reference cycle
        self._name = name
        self._previous = previous  # an instance attribute that was there before, if any

    def _own_cache(self) -> Any:
        cache = self._cache()
        if cache is None:  # pragma: no cover - the cache owns this object
            raise ReferenceError("the cache this method belongs to no longer exists")
        return cache

    def _call_original(self, cache: Any, argument: Any) -> Any:
        if self._previous is not None:
            return self._previous(argument)
        return getattr(type(cache), self._name)(cache, argument)

    def __reduce__(self) -> tuple[Any, ...]:
        # the session's state travels in the cache's own attributes
        return (type(self), (self._cache(), self._name, self._previous))


class FollowCrop(FollowEdit):
    """Stands in for a compressed cache's ``crop``: the session's state forgets the removed entries.

    ``crop(-r)`` removes the last ``r`` entries of every layer. On a compressed layer those are
    the last ``r`` tokens added after the prompt (decoded or verified tokens are appended in
    order), so the session drops the same slots and moves each row's next position back by its
    real tokens among them. A crop that would reach into the compressed prompt, or one on a cache
    whose strategy evicts while decoding, is refused before the cache changes
    (:meth:`CacheState.check_crop`). A positive argument (an absolute length, the convention
    of older transformers) has no meaning on a compressed cache and is refused too.
    """

    def __call__(self, tokens_to_remove: int) -> Any:
        """Check the crop, call the cache's own ``crop``, then drop the same entries from the state."""
        cache = self._own_cache()
        state = state_of(cache)
        count = -int(tokens_to_remove)
        if state is not None:
            check_row_method(cache, "crop")
            if count < 0:
                raise InvalidInputError(
                    f"crop({int(tokens_to_remove)}) on a compressed cache: a positive argument is an absolute "
                    "length in the uncompressed sequence, which a compressed cache does not hold. Pass the number "
                    "of entries to remove from the end, negated (crop(-r))"
                )
            state.check_crop(count)
        result = self._call_original(cache, tokens_to_remove)
        if state is not None:
            state.drop_last(count)
        return result


class FollowRows(FollowEdit):
    """Stands in for one of a compressed cache's :data:`ROW_METHODS`.

    Calls the cache's own method, then selects the same rows of everything the session keeps
    about the cache (slot masks, strategy state such as ``h2o``'s scores, next positions, the
    adapter's prompt record), so that per-row state stays with its row when beam search
    reorders the beams.
    """

    def __call__(self, argument: Any) -> Any:
        """Call the cache's own method, then select the same rows of the session's state."""
        cache = self._own_cache()
        check_row_method(cache, self._name)
        state = state_of(cache)
        nested = state is not None and state.changing_rows
        rows = None if state is None or nested else state.rows_for(self._name, argument)
        if state is not None:
            state.changing_rows = True
        try:
            result = self._call_original(cache, argument)
        finally:
            if state is not None and not nested:
                state.changing_rows = False
        if state is not None and rows is not None:
            state.select_rows(*rows)
        return result
