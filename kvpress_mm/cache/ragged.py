"""Ragged per-head storage: a KV-cache layer whose KV heads hold different numbers of entries.

``adakv`` gives each KV head of a layer its own budget (the layer's total stays
``kv_heads * n_keep``), so the heads of a compressed layer have different lengths. A rectangular
``[batch, kv_heads, seq, head_dim]`` tensor would have to be padded to the longest head, which
for AdaKV's uneven budgets saves little over not compressing at all; kvpress does not even pad
(it keeps the full cache and masks). :class:`RaggedLayer` stores each KV head in its own buffers:

```text
head h:  keys [batch, capacity_h, head_dim]   values [batch, capacity_h, head_dim]
         filled part: the first length_h entries; validity [batch, capacity_h] or None
```

- ``length_h`` is the largest number of entries any row keeps in head ``h`` (plus the decoded
  ones); a row that keeps fewer gets *filler* slots at the front of the head (zeroed, marked
  invalid, never attended to), exactly as rows of a rectangular layer do. So the stored entries
  are ``sum_h length_h`` per row - for one row exactly ``kv_heads * n_keep`` after the prefill.
- Right after compression each head holds exactly its entries; the first append reallocates
  each head once with ``headroom`` free entries, later appends write in place and grow
  geometrically, as in :class:`~kvpress_mm.cache.growing.GrowingLayer` (the same policy,
  :func:`~kvpress_mm.cache.growing.grown_capacity`, head by head).
- :meth:`RaggedLayer.update` appends one entry per new token to every head and returns only the
  new entries: attention over a ragged layer is computed by the compressor session, head by
  head with the model's own ``sdpa`` / ``eager`` function (``kvpress_mm.session.ragged``), which
  reads the heads through :meth:`RaggedLayer.head`. Outside a compressor session the layer
  refuses to be used (``update`` raises), so it never silently attends to the new tokens only.
- Everything transformers calls on a cache layer works: ``get_seq_length`` (the longest head),
  ``get_mask_sizes``, beam search's ``reorder_cache``, ``batch_select_indices``,
  ``batch_repeat_interleave``, ``crop`` (removes the last entries of every head), ``reset``
  (the layer becomes an empty ``DynamicLayer`` again), ``offload`` / ``prefetch``. There is no
  ``keys`` / ``values`` tensor: reading them raises an error that points to :meth:`RaggedLayer.head`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from kvpress_mm.cache.growing import DEFAULT_GROWTH, DEFAULT_HEADROOM, GrowingLayer, grown_capacity
from kvpress_mm.errors import UnsupportedCacheError
from kvpress_mm.ops.plan import CompressionPlan


@dataclass
class HeadEntries:
    """One KV head of a :class:`RaggedLayer`: views of its filled part."""

    keys: torch.Tensor  # [batch, length, head_dim]
    values: torch.Tensor  # [batch, length, head_dim]
    valid: torch.Tensor | None  # [batch, length] bool, False for filler slots; None = all real


@dataclass
class _HeadBuffer:
    """The storage of one KV head: buffers with ``length`` filled entries (of ``capacity``)."""

    keys: torch.Tensor  # [batch, capacity, head_dim]
    values: torch.Tensor  # [batch, capacity, head_dim]
    valid: torch.Tensor | None  # [batch, capacity] bool, None = every filled slot is real
    length: int
    base: int  # entries adopted at compression: growth is geometric beyond them

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[1])

    def entries(self) -> HeadEntries:
        valid = None if self.valid is None else self.valid[:, : self.length]
        return HeadEntries(self.keys[:, : self.length], self.values[:, : self.length], valid)

    def reserve(self, needed: int, headroom: int, growth: float) -> bool:
        """Make room for ``needed`` entries; True when the buffers were reallocated."""
        if needed <= self.capacity:
            return False
        capacity = grown_capacity(needed, self.capacity, self.base, headroom, growth)
        self.keys = _regrown(self.keys, self.length, capacity)
        self.values = _regrown(self.values, self.length, capacity)
        if self.valid is not None:
            self.valid = _regrown(self.valid, self.length, capacity, fill=True)
        return True

    def map_rows(self, select: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a row selection / repetition to every buffer (the filled part only is kept)."""
        self.keys = select(self.keys[:, : self.length]).contiguous()
        self.values = select(self.values[:, : self.length]).contiguous()
        if self.valid is not None:
            self.valid = select(self.valid[:, : self.length]).contiguous()
        self.base = min(self.base, self.length)


def _regrown(buffer: torch.Tensor, length: int, capacity: int, fill: bool = False) -> torch.Tensor:
    """A buffer like ``buffer`` with ``capacity`` entries along dim 1, its first ``length`` copied."""
    shape = (buffer.shape[0], capacity, *buffer.shape[2:])
    grown = (torch.ones if fill else torch.empty)(shape, dtype=buffer.dtype, device=buffer.device)
    grown[:, :length].copy_(buffer[:, :length])
    return grown


#: Tells a ragged layer whether the compressor session that reads it is active (see ``claim``).
Reader = Callable[[], bool]


class RaggedLayer(DynamicLayer):
    """A cache layer storing each KV head in its own buffers, so heads may hold different lengths.

    Built by ``apply_ragged_plan`` (the session's plan application) from a layer and a ragged
    plan: the same object changes class, as ``GrowingLayer.adopt`` does.

    Attributes:
        headroom: free entries allocated per head beyond what is needed when it grows.
        growth: capacity multiplier of a full head (beyond its adopted entries).
        reallocations: how many times the heads were (re)allocated (for tests and benchmarks).

    """

    is_croppable = True

    def _setup(self, heads: list[_HeadBuffer], device: torch.device, headroom: int, growth: float) -> None:
        self._heads = heads
        self.device = device
        self.headroom = int(headroom)
        self.growth = float(growth)
        self.reallocations = 0
        self._reader: Reader | None = None
        self.is_initialized = True

    # -- what the session reads ------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        """Number of KV heads."""
        return len(self._heads)

    @property
    def batch_size(self) -> int:
        """Rows held."""
        return int(self._heads[0].keys.shape[0])

    @property
    def head_lengths(self) -> list[int]:
        """Filled entries of each head (filler slots included)."""
        return [head.length for head in self._heads]

    def head(self, index: int) -> HeadEntries:
        """KV head ``index``'s keys, values ``[batch, length, head_dim]`` and validity ``[batch, length]``."""
        return self._heads[index].entries()

    def claim(self, reader: Reader) -> None:
        """Let the session that calls ``reader`` (True while it is active) read and extend the layer."""
        self._reader = reader

    def mark_invalid_tail(self, new_valid: torch.Tensor) -> None:
        """Mark the last ``q`` entries of every head as ``new_valid [batch, q]`` (left-padded new tokens)."""
        q = int(new_valid.shape[-1])
        for head in self._heads:
            if head.valid is None:
                head.valid = torch.ones(head.keys.shape[:2], dtype=torch.bool, device=head.keys.device)
            head.valid[:, head.length - q : head.length] = new_valid.to(head.valid.device)

    def stored_bytes(self) -> int:
        """Bytes of the filled keys and values of every head (filler slots included, headroom not)."""
        return sum(
            head.length * (t.shape[0] * t.shape[2] * t.element_size())
            for head in self._heads
            for t in (head.keys, head.values)
        )

    def allocated_bytes(self) -> int:
        """Bytes of every head's key, value and validity buffers (headroom included)."""
        return sum(
            t.numel() * t.element_size()
            for head in self._heads
            for t in (head.keys, head.values, head.valid)
            if t is not None
        )

    # -- no rectangular tensors --------------------------------------------------------------

    @property
    def keys(self) -> torch.Tensor:
        """Not available: the heads have different lengths. Use :meth:`head`."""
        raise UnsupportedCacheError(_NO_RECTANGLE.format(what="keys"))

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        raise UnsupportedCacheError(_NO_RECTANGLE.format(what="keys"))

    @property
    def values(self) -> torch.Tensor:
        """Not available: the heads have different lengths. Use :meth:`head`."""
        raise UnsupportedCacheError(_NO_RECTANGLE.format(what="values"))

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        raise UnsupportedCacheError(_NO_RECTANGLE.format(what="values"))

    # -- transformers' cache-layer contract ---------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: a ragged layer is built initialized."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, kvH, new, D]`` keys and values to every head; return the new entries only.

        Raises:
            UnsupportedCacheError: no active compressor session reads this layer (the model's
                own attention would see only the new entries), or the shapes do not fit.

        """
        if self._reader is None or not self._reader():
            raise UnsupportedCacheError(
                "this cache holds ragged per-head layers (adakv): its KV heads have different lengths, which only "
                "kvpress-mm's attention can read. Continue generating inside `with compressor(model):` (any "
                "kvpress-mm compressor), or start from a new cache"
            )
        batch, heads, new, dim = key_states.shape
        if heads != self.kv_heads or batch != self.batch_size or dim != self._heads[0].keys.shape[-1]:
            raise UnsupportedCacheError(
                f"cannot append entries of shape {tuple(key_states.shape)} to a ragged cache layer of "
                f"{self.batch_size} rows and {self.kv_heads} KV heads"
            )
        grew = False
        for h, head in enumerate(self._heads):
            grew |= head.reserve(head.length + new, self.headroom, self.growth)
            head.keys[:, head.length : head.length + new].copy_(key_states[:, h])
            head.values[:, head.length : head.length + new].copy_(value_states[:, h])
            if head.valid is not None:
                head.valid[:, head.length : head.length + new] = True
            head.length += new
        self.reallocations += int(grew)
        return key_states, value_states

    def get_seq_length(self) -> int:
        """The longest head's filled entries (the slots a layout padded to the longest head would have)."""
        return max(self.head_lengths, default=0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(get_seq_length() + query_length, 0)``; the session builds each head's mask itself."""
        return self.get_seq_length() + query_length, 0

    def reset(self) -> None:
        """Drop every head: the layer becomes an empty ``DynamicLayer`` (as transformers' reset leaves one)."""
        vars(self).clear()
        self.__class__ = DynamicLayer  # type: ignore[assignment]
        DynamicLayer.__init__(self)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` entries of every head (the most recent tokens).

        Raises:
            ValueError: ``tokens_to_remove`` is positive (as ``DynamicLayer.crop``) or removes
                more entries than a head holds.

        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): a positive value is not supported; "
                "pass a negative number of tokens to remove"
            )
        remove = -tokens_to_remove
        if remove > min(self.head_lengths):
            raise ValueError(
                f"cannot crop {remove} entries: the shortest head of this ragged layer holds {min(self.head_lengths)}"
            )
        for head in self._heads:
            head.length -= remove

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the rows (beam search)."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (in that order)."""
        for head in self._heads:
            head.map_rows(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times."""
        for head in self._heads:
            head.map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        """Move every head to the CPU."""
        self._move(torch.device("cpu"))

    def prefetch(self) -> None:
        """Move every head back to the layer's device."""
        self._move(self.device)

    def _move(self, device: torch.device) -> None:
        for head in self._heads:
            head.keys, head.values = head.keys.to(device), head.values.to(device)
            if head.valid is not None:
                head.valid = head.valid.to(device)

    def __getstate__(self) -> dict[str, Any]:
        # a copy (deepcopy, pickle) is not read by the session that reads this layer: it must be claimed
        state = dict(vars(self))
        state["_reader"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


_NO_RECTANGLE = (
    "a ragged cache layer (adakv) has no rectangular {what} tensor: its KV heads hold different numbers of "
    "entries. Read them head by head with layer.head(h) (keys, values [batch, length, head_dim] and validity); "
    "to change them, use the layer's methods (update, crop, reorder_cache, ...)"
)


def can_hold_ragged_heads(layer: Any) -> bool:
    """True for the layers :func:`apply_ragged_plan` turns ragged: a plain ``DynamicLayer`` or a ``GrowingLayer``."""
    return type(layer) is DynamicLayer or type(layer) is GrowingLayer


def ragged_storage_refusal(layer: Any) -> UnsupportedCacheError:
    """The error for a plan with per-head budgets on a layer that cannot hold heads of different lengths."""
    return UnsupportedCacheError(
        f"ragged per-head storage (adakv) needs a DynamicLayer or GrowingLayer cache layer, not a "
        f"{type(layer).__name__}: quantized, offloaded and static caches cannot hold heads of different "
        "lengths. Use transformers' DynamicCache, or a strategy with uniform per-head budgets"
    )


def apply_ragged_plan(
    layer: Any, plan: CompressionPlan, headroom: int = DEFAULT_HEADROOM, growth: float = DEFAULT_GROWTH
) -> RaggedLayer:
    """Make ``layer`` (the same object) a :class:`RaggedLayer` holding each head's kept slots of ``plan``.

    Head ``h`` stores the last ``n_h`` slots of the plan's head ``h`` (``n_h``: its longest row;
    filler slots first, zeroed), each in storage of exactly its entries; the layer's previous
    tensors are released.

    Raises:
        UnsupportedCacheError: ``layer`` is not a plain ``DynamicLayer`` or a
            :class:`~kvpress_mm.cache.growing.GrowingLayer` (for instance a quantized layer,
            or a layer that is ragged already).

    """
    if not can_hold_ragged_heads(layer):
        raise ragged_storage_refusal(layer)
    assert plan.head_valid is not None, "apply_ragged_plan needs a ragged plan (head_valid set)"
    keys, values = layer.keys, layer.values
    assert keys is not None and values is not None, "an empty cache layer has no entries to keep"
    index = plan.kept_indices.to(keys.device)
    head_valid = plan.head_valid.to(keys.device)
    n_slots = plan.n_slots
    heads = []
    for h in range(int(index.shape[1])):
        # the head's slots that some row fills (filler slots come first, so that is a suffix)
        used = int(head_valid[:, h].any(0).sum())
        slots = slice(n_slots - used, n_slots)
        head_keys = _head_entries(keys[:, h], plan.keys, h, index[:, h, slots], slots)
        head_values = _head_entries(values[:, h], plan.values, h, index[:, h, slots], slots)
        valid = head_valid[:, h, slots].contiguous()
        if bool(valid.all()):
            heads.append(_HeadBuffer(head_keys, head_values, None, used, used))
            continue
        filler = ~valid[..., None]
        heads.append(
            _HeadBuffer(head_keys.masked_fill_(filler, 0), head_values.masked_fill_(filler, 0), valid, used, used)
        )
    device = keys.device
    del keys, values
    vars(layer).clear()  # releases the rectangular storage
    layer.__class__ = RaggedLayer
    assert isinstance(layer, RaggedLayer)
    layer._setup(heads, device, headroom, growth)
    return layer


def _head_entries(
    source: torch.Tensor, merged: torch.Tensor | None, h: int, index: torch.Tensor, slots: slice
) -> torch.Tensor:
    """``[B, n, D]`` entries of one head in storage of their own: merged ones, or gathered from ``source [B, P, D]``."""
    dtype = source.dtype
    if merged is not None:
        return merged[:, h, slots].to(dtype).clone(memory_format=torch.contiguous_format)
    return source.gather(1, index[..., None].expand(-1, -1, source.shape[-1]))
