"""A KV-cache layer that appends in place: preallocated capacity that grows geometrically.

transformers' ``DynamicLayer.update`` does ``keys = torch.cat([keys, new], -2)``: every decode
step allocates a new cache tensor and copies the whole cache into it, so a step costs a full
cache copy (plus fresh pages from the allocator) on top of attention's own read of the cache.
On a long prompt that copy, not attention, dominates the decode step.

:class:`GrowingLayer` keeps each of its keys and values in a buffer
``[batch, kv_heads, capacity, head_dim]`` and writes new entries into the free tail; when the
tail is full it reallocates to ``max(needed + headroom, growth * capacity)``, so appends cost
O(1) amortized (for a layer adopted from a compressed cache, the growth applies to the
appended entries only, not to the adopted prompt entries). ``layer.keys`` / ``layer.values``
are views of the filled part ``[batch, kv_heads, seq, head_dim]`` - exactly what a ``DynamicLayer`` holds, so attention,
masks, ``get_seq_length`` and every transformers cache method see the same thing. Assigning
``layer.keys = tensor`` (cache surgery, beam search's ``reorder_cache``, ``crop``) copies into
the buffer when it fits and is not oversized, and reallocates otherwise, so shrinking a
cache still releases its memory.

Buffers can be *shared* between layers (:meth:`GrowingLayer.share_buffers`, what
:func:`kvpress_mm.fork_cache` does for a compressed context asked several questions): a shared
buffer is copy-on-write - the first append or assignment that would write into it allocates the
layer its own buffer first, so no layer ever writes what another reads. ``copy.deepcopy`` copies
only the filled part of the buffers (no headroom).

The compressor session moves every layer it compresses into a ``GrowingLayer`` whose storage is
exactly the kept entries; the first decode step reallocates once with a little headroom
(``compressor(model, growing_cache=False)`` keeps ``DynamicLayer``); for an
uncompressed run, :func:`growing_dynamic_cache` builds a ``DynamicCache`` of growing layers:

```python
from kvpress_mm.cache.growing import growing_dynamic_cache

cache = growing_dynamic_cache(model.config)
out = model.generate(**inputs, max_new_tokens=64, cache=cache)
```
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

#: Free entries allocated beyond what is needed when a buffer is (re)allocated.
DEFAULT_HEADROOM = 128
#: Capacity multiplier when the buffer is full.
DEFAULT_GROWTH = 2.0


def grown_capacity(needed: int, current: int, base: int, headroom: int, growth: float) -> int:
    """The capacity of a buffer that must hold ``needed`` entries and now holds ``current`` (0: none yet).

    ``max(needed + headroom, base + ceil((current - base) * growth))``: geometric growth in the
    entries beyond the ``base`` ones (the entries a layer adopted at construction, never doubled).

    >>> grown_capacity(5, 0, 0, 4, 2.0), grown_capacity(11, 9, 0, 4, 2.0), grown_capacity(101, 100, 100, 4, 2.0)
    (9, 18, 105)
    """
    base = min(base, current)
    grown = base + math.ceil((current - base) * growth) if current else 0
    return max(needed + headroom, grown)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values grow in place in a preallocated buffer.

    (Why one class of about 300 lines: it overrides every method of transformers' cache layer
    that reads or edits the entries - update, crop, reorder, row selection and repetition,
    offload, copies - so that none of them sees the unused buffer.)

    Args:
        headroom: free entries allocated beyond what is needed at each (re)allocation.
        growth: when full, the capacity becomes ``max(needed + headroom, growth * capacity)``
            (geometric growth: appending costs O(1) amortized).

    Attributes:
        capacity: entries the buffers can hold without reallocating (0 before the first update).
        reallocations: how many times the buffers were (re)allocated (for tests and benchmarks).

    Examples:
        >>> layer = GrowingLayer(headroom=4)
        >>> keys, values = layer.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
        >>> keys.shape, layer.capacity
        (torch.Size([1, 2, 3, 8]), 7)
        >>> _ = layer.update(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8))
        >>> layer.get_seq_length(), layer.capacity, layer.reallocations
        (4, 7, 1)

    """

    def __init__(self, headroom: int = DEFAULT_HEADROOM, growth: float = DEFAULT_GROWTH, **kwargs: Any) -> None:
        self._setup(headroom, growth)
        super().__init__(**kwargs)  # sets keys = values = None through the properties

    def _setup(self, headroom: int, growth: float) -> None:
        if headroom < 0:
            raise ValueError(f"headroom must be >= 0, got {headroom}")
        if not growth > 1.0:
            raise ValueError(f"growth must be > 1 (geometric growth), got {growth}")
        self.headroom = int(headroom)
        self.growth = float(growth)
        self.reallocations = 0
        self._key_buffer: torch.Tensor | None = None  # [B, kvH, capacity, D]
        self._value_buffer: torch.Tensor | None = None
        self._key_length = 0  # filled entries of each buffer
        self._value_length = 0
        self._empty: torch.Tensor | None = None  # what `keys` is once initialized and still empty
        self._base = 0  # entries adopted at construction: growth is geometric in the entries beyond them
        # copy-on-write: the buffer is shared with another layer, never written in place (share_buffers)
        self._key_shared = False
        self._value_shared = False

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_tensors(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        headroom: int = DEFAULT_HEADROOM,
        growth: float = DEFAULT_GROWTH,
    ) -> GrowingLayer:
        """A layer holding ``keys`` / ``values`` ``[B, kvH, seq, D]`` (copied) with ``headroom`` free entries."""
        layer = cls(headroom=headroom, growth=growth)
        layer.lazy_initialization(keys, values)
        layer.keys = keys
        layer.values = values
        return layer

    @classmethod
    def adopt(
        cls,
        layer: DynamicLayer,
        headroom: int = DEFAULT_HEADROOM,
        growth: float = DEFAULT_GROWTH,
        exact: bool = False,
    ) -> GrowingLayer:
        """Turn a plain ``DynamicLayer`` into a ``GrowingLayer`` in place; its entries are copied into a buffer.

        The object stays the same (``cache.layers[i]`` and any other reference to it remain
        valid); only its class and storage change. The adopted entries are the layer's *base*:
        later growth is geometric in the entries appended after them, never in the base, so
        a long compressed prompt is not doubled in memory by a short generation. With
        ``exact``, the buffer holds exactly the adopted entries (no headroom until the first
        append, which reallocates once to ``needed + headroom``). Returns ``layer``.
        """
        if type(layer) is not DynamicLayer:
            raise TypeError(f"only a plain DynamicLayer can become a GrowingLayer, not a {type(layer).__name__}")
        state = vars(layer)
        keys, values = state.pop("keys", None), state.pop("values", None)  # the properties take over
        layer.__class__ = cls
        assert isinstance(layer, cls)
        layer._setup(headroom, growth)
        if layer.is_initialized and keys is not None and values is not None:
            layer._empty = torch.tensor([], dtype=keys.dtype, device=keys.device)
            if exact:
                layer.headroom = 0
            layer.keys = keys
            layer.values = values
            layer.headroom = int(headroom)
            if keys.dim() == 4:
                layer._base = int(keys.shape[-2])
        return layer

    # -- the filled part, as plain tensors ----------------------------------------------

    @property
    def keys(self) -> torch.Tensor | None:
        """``[batch, kv_heads, seq, head_dim]``: a view of the filled part of the key buffer."""
        if self._key_buffer is None:
            return self._empty
        return self._key_buffer[:, :, : self._key_length]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        buffer = self._key_buffer
        self._key_buffer, self._key_length = self._store(buffer, tensor, count=True, shared=self._key_shared)
        self._key_shared = self._key_shared and self._key_buffer is buffer

    @property
    def values(self) -> torch.Tensor | None:
        """``[batch, kv_heads, seq, head_dim]``: a view of the filled part of the value buffer."""
        if self._value_buffer is None:
            return self._empty
        return self._value_buffer[:, :, : self._value_length]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        buffer = self._value_buffer
        self._value_buffer, self._value_length = self._store(buffer, tensor, count=False, shared=self._value_shared)
        self._value_shared = self._value_shared and self._value_buffer is buffer

    @property
    def capacity(self) -> int:
        """Entries the buffers hold without reallocating."""
        return 0 if self._key_buffer is None else int(self._key_buffer.shape[-2])

    def allocated_bytes(self) -> int:
        """Bytes of the key and value buffers (filled part and headroom)."""
        return sum(b.numel() * b.element_size() for b in (self._key_buffer, self._value_buffer) if b is not None)

    @property
    def buffers(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The key and value buffers ``[batch, kv_heads, capacity, head_dim]`` (``None`` before the first update)."""
        return self._key_buffer, self._value_buffer

    @property
    def shares_buffers(self) -> bool:
        """True while a buffer may be shared with another layer (copy-on-write, see :meth:`share_buffers`)."""
        return self._key_shared or self._value_shared

    def share_buffers(self) -> None:
        """Declare the buffers shared with another layer: from now on this layer never writes into them.

        The next append (or assignment that would copy into a buffer) allocates the layer its own
        buffer first, of the size the append needs plus headroom. Reading costs nothing extra;
        until then both layers hold one copy of the entries. Call it on every layer that holds
        the buffers (:func:`kvpress_mm.fork_cache` does).
        """
        self._key_shared = self._key_buffer is not None
        self._value_shared = self._value_buffer is not None

    def __deepcopy__(self, memo: dict[int, Any]) -> GrowingLayer:
        """A copy holding only the filled part of the buffers (buffers already in ``memo`` are shared as they are)."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for name, value in vars(self).items():
            if name in ("_key_buffer", "_value_buffer") and isinstance(value, torch.Tensor) and id(value) not in memo:
                length = self._key_length if name == "_key_buffer" else self._value_length
                value = value[:, :, :length].clone()  # the filled part only, own storage
            else:
                value = copy.deepcopy(value, memo)
            setattr(copied, name, value)
        return copied

    # -- DynamicLayer's contract ----------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Remember device and dtype; buffers are allocated by the first update."""
        self.device = key_states.device
        self._key_buffer = self._value_buffer = None
        self._key_length = self._value_length = 0
        self._empty = torch.tensor([], dtype=key_states.dtype, device=self.device)
        self._key_shared = self._value_shared = False
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, kvH, new, D]`` keys and values in place; return views of the whole cache."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._key_buffer, self._key_length = self._append(
            self._key_buffer, self._key_length, key_states, True, self._key_shared
        )
        self._value_buffer, self._value_length = self._append(
            self._value_buffer, self._value_length, value_states, False, self._value_shared
        )
        self._key_shared = self._value_shared = False  # appending always leaves the layer its own buffers
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        return keys, values

    def get_seq_length(self) -> int:
        """Entries held (the filled part of the key buffer)."""
        if not self.is_initialized or self._key_buffer is None:
            return 0
        return self._key_length

    def reset(self) -> None:
        """Drop the buffers (their memory is released), as ``DynamicLayer.reset`` drops its tensors."""
        super().reset()
        self._empty = None
        self._key_shared = self._value_shared = False

    # -- buffer management ------------------------------------------------------------------

    def _capacity_for(self, needed: int, current: int = 0) -> int:
        return grown_capacity(needed, current, self._base, self.headroom, self.growth)

    def _allocate(
        self, like: torch.Tensor, capacity: int, count: bool, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        self.reallocations += int(count)  # the key and value buffers are (re)allocated together
        batch, heads, _, dim = like.shape
        return torch.empty(batch, heads, capacity, dim, dtype=dtype or like.dtype, device=like.device)

    def _append(
        self, buffer: torch.Tensor | None, length: int, new: torch.Tensor, count: bool, shared: bool = False
    ) -> tuple[torch.Tensor, int]:
        needed = length + int(new.shape[-2])
        if buffer is None:
            dtype = self._empty.dtype if self._empty is not None else new.dtype
            buffer = self._allocate(new, self._capacity_for(needed), count, dtype)
        elif shared or needed > buffer.shape[-2] or buffer.shape[:2] != new.shape[:2]:
            if buffer.shape[:2] != new.shape[:2] or buffer.shape[-1] != new.shape[-1]:
                raise ValueError(
                    f"cannot append entries of shape {tuple(new.shape)} to a cache of shape "
                    f"{tuple(buffer[:, :, :length].shape)}"
                )
            grown = self._allocate(buffer, self._capacity_for(needed, int(buffer.shape[-2])), count)
            grown[:, :, :length].copy_(buffer[:, :, :length])
            buffer = grown
        buffer[:, :, length:needed].copy_(new)
        return buffer, needed

    def _store(
        self, buffer: torch.Tensor | None, tensor: torch.Tensor | None, count: bool, shared: bool = False
    ) -> tuple[torch.Tensor | None, int]:
        """Make ``tensor`` the filled part: in ``buffer`` when it fits and is not oversized, else a new buffer.

        A ``shared`` buffer is never written: only a prefix view of it is kept as it is.
        """
        if tensor is None:
            return None, 0
        if tensor.dim() != 4:  # DynamicLayer's empty 1-D placeholder (lazy_initialization)
            self._empty = torch.tensor([], dtype=tensor.dtype, device=tensor.device)
            return None, 0
        n = int(tensor.shape[-2])
        if buffer is not None and self._shares_memory(buffer, tensor):
            if self._is_prefix(buffer, tensor) and self._fits(buffer, tensor):
                return buffer, n  # crop, or `layer.keys = layer.keys`: nothing to copy
            if not shared:
                tensor = tensor.clone()  # overlapping source: copy it out before writing the buffer
        if buffer is None or shared or not self._fits(buffer, tensor):
            buffer = self._allocate(tensor, self._capacity_for(n), count)
        buffer[:, :, :n].copy_(tensor)
        return buffer, n

    def _fits(self, buffer: torch.Tensor, tensor: torch.Tensor) -> bool:
        """Same layout, room for ``tensor``, and not so large that keeping it would waste memory."""
        n = int(tensor.shape[-2])
        capacity = int(buffer.shape[-2])
        return (
            buffer.shape[:2] == tensor.shape[:2]
            and buffer.shape[-1] == tensor.shape[-1]
            and buffer.dtype == tensor.dtype
            and buffer.device == tensor.device
            and n <= capacity <= self.growth * (n + self.headroom)
        )

    @staticmethod
    def _shares_memory(buffer: torch.Tensor, tensor: torch.Tensor) -> bool:
        return (
            tensor.device == buffer.device
            and tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        )

    @staticmethod
    def _is_prefix(buffer: torch.Tensor, tensor: torch.Tensor) -> bool:
        return tensor.data_ptr() == buffer.data_ptr() and tensor.stride() == buffer.stride()


def growing_dynamic_cache(
    config: Any = None, headroom: int = DEFAULT_HEADROOM, growth: float = DEFAULT_GROWTH
) -> DynamicCache:
    """A ``DynamicCache`` whose full-attention layers are :class:`GrowingLayer` s.

    Args:
        config: the model's config (``model.config``), as for ``DynamicCache(config=...)``;
            sliding-window and other special layers keep transformers' classes. Without a
            config, layers are created lazily, all growing.
        headroom: see :class:`GrowingLayer`.
        growth: see :class:`GrowingLayer`.

    """
    cache = DynamicCache(config=config)
    if config is None:
        cache.layer_class_to_replicate = lambda: GrowingLayer(headroom=headroom, growth=growth)  # type: ignore[assignment]
        return cache
    cache.layers = [
        GrowingLayer(headroom=headroom, growth=growth) if type(layer) is DynamicLayer else layer
        for layer in cache.layers
    ]
    return cache


def grow_in_place(layer: Any, headroom: int = DEFAULT_HEADROOM) -> None:
    """Make a compressed ``DynamicLayer`` a :class:`GrowingLayer` (the same object) holding exactly its entries.

    Decode steps then append in place instead of copying the whole cache; the first one
    reallocates once with ``headroom`` free entries. Any other layer (a ``GrowingLayer``, a
    :class:`~kvpress_mm.cache.ragged.RaggedLayer`, which grows head by head, a quantized layer,
    which keeps its own storage) is left as it is.
    """
    if type(layer) is DynamicLayer:
        GrowingLayer.adopt(layer, headroom=headroom, exact=True)
