"""A compressed layer's whole current cache as a :class:`~kvpress_mm.LayerView`: what a re-plan sees.

Strategies plan a prompt right after its prefill. Two wrappers plan again later, on what a
layer holds by then: ``decoding`` (the cache after some decode steps, with the queries of
the last steps) and ``chunked-prefill`` (the compressed earlier chunks plus the chunk just
fed, with that chunk's queries). A :class:`CacheView` presents such a cache so that any
strategy plans on it unchanged:

- ``keys`` / ``values``: every slot the layer holds, the newest last (filler slots of shorter
  rows at the front, marked ``PADDING``);
- ``queries``: those of the last ``q`` slots only (the chunk's, or the buffered decode
  steps'), so query ``i`` sees the slots up to its own, as it did when it ran: the statistics
  (``window_attention_per_head``, ``accumulated_attention_per_head``) are over these queries;
- ``head_modality``: each KV head's entry at each slot has its own modality (selections are per
  KV head, so after a compression the same slot may hold a text entry in one head and an image
  entry in another); ``modality`` is the lowest code over the heads (``TEXT`` where any head
  holds a text entry), for code that needs one map per row;
- ``carried_attention``: optionally, attention the entries received from queries of earlier
  calls (a chunked prefill carries the accumulated attention across chunks); it is added to
  :meth:`accumulated_attention_per_head`.

Positions never change: keys keep the RoPE of their original positions.
"""

from __future__ import annotations

from typing import Any

import torch

from kvpress_mm.modality import Modality
from kvpress_mm.ops.views import DecodeView, LayerView


class CacheView(LayerView):
    """One layer's whole current cache, with the queries of its last ``q`` slots.

    Attributes:
        carried_attention: ``[batch, heads, seq]`` float32 or ``None``: attention each slot's
            entry received before this view's queries (see the module docstring).

    Everything else is :class:`~kvpress_mm.LayerView`'s; ``queries`` are
    ``[batch, heads, q, head_dim]`` with ``q <= seq`` (``query_offset`` = ``seq - q``).

    Examples:
        Two slots held, one new decode step (its entry is the last slot):

        >>> keys = torch.randn(1, 1, 3, 4)
        >>> modality = torch.tensor([[[1, 0, 0]]], dtype=torch.int8)  # [batch, kv_heads, seq]
        >>> view = CacheView(layer_idx=0, keys=keys, values=keys, queries=torch.randn(1, 2, 1, 4),
        ...                  scaling=0.5, head_modality=modality, n_keep=(2,))
        >>> view.query_offset, view.modality.tolist()
        (2, [[1, 0, 0]])
        >>> view.accumulated_attention().shape
        torch.Size([1, 1, 3])

    """

    def __init__(
        self,
        *,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor,
        scaling: float,
        head_modality: torch.Tensor,
        n_keep: tuple[int, ...],
        state: dict[str, Any] | None = None,
        carried_attention: torch.Tensor | None = None,
        **view_options: Any,
    ) -> None:
        b, kvh, seq = (int(n) for n in keys.shape[:3])
        if tuple(head_modality.shape) != (b, kvh, seq):
            shape = list(head_modality.shape)
            raise ValueError(f"head_modality must be [batch, kv_heads, seq] = {[b, kvh, seq]}, got {shape}")
        if int(queries.shape[2]) > seq:
            count = int(queries.shape[2])
            raise ValueError(f"{count} queries for {seq} cached entries: queries belong to the last entries")
        padding = head_modality == Modality.PADDING
        if bool((padding.any(1) != padding.all(1)).any()):
            raise ValueError("a filler slot must be PADDING in every KV head (filler slots are per row)")
        if carried_attention is not None and tuple(carried_attention.shape) != (b, int(queries.shape[1]), seq):
            raise ValueError(
                f"carried_attention must be [batch, heads, seq] = {[b, int(queries.shape[1]), seq]}, "
                f"got {list(carried_attention.shape)}"
            )
        super().__init__(
            layer_idx=layer_idx,
            keys=keys,
            values=values,
            queries=queries,
            scaling=scaling,
            modality=head_modality.amin(1),
            n_keep=n_keep,
            state=state,
            **view_options,
        )
        self._head_modality = head_modality
        self.carried_attention = carried_attention

    @property
    def head_modality(self) -> torch.Tensor:
        """``[batch, kv_heads, seq]`` int8: the modality of each KV head's entry at each slot."""
        return self._head_modality

    def accumulated_attention_per_head(self) -> torch.Tensor:
        """``[batch, heads, seq]`` float32: the view's queries' column sums, plus ``carried_attention``."""
        current = super().accumulated_attention_per_head()
        if self.carried_attention is None:
            return current
        key = ("accumulated", "carried")
        if key not in self._cache:
            self._cache[key] = current + self.carried_attention.to(current.device)
        return self._cache[key]


#: Where :func:`remember_decode_queries` keeps a layer's recent decode queries (in ``DecodeView.state``).
DECODE_QUERIES = "decode_queries"


def remember_decode_queries(view: DecodeView, capacity: int, key: str = DECODE_QUERIES) -> torch.Tensor:
    """Add the step's post-RoPE queries to the layer's buffer; return the last ``capacity`` ones, oldest first.

    The buffer lives in ``view.state[key]`` (so it follows the cache's rows when beam search
    reorders them): a ``[batch, heads, capacity, head_dim]`` ring written in place, the number
    of queries it holds, and the layer's length after the last step. The buffered queries are
    those of the layer's last entries, in order: each decode step appends one entry per new
    query. If the layer got shorter since (a cache cropped by assisted decoding), the queries of
    the removed entries are dropped first.

    Returns:
        ``[batch, heads, n, head_dim]``, ``n = min(capacity, queries since the buffer was last cleared)``.

    """
    queries = view.queries.detach()
    new = int(queries.shape[2])
    length = int(view.keys.shape[2])
    buffer = view.state.get(key)
    if buffer is None or tuple(buffer["queries"].shape) != (*queries.shape[:2], capacity, queries.shape[-1]):
        ring = torch.empty(*queries.shape[:2], capacity, queries.shape[-1], dtype=queries.dtype, device=queries.device)
        buffer = {"queries": ring, "count": 0, "next": 0, "length": length - new}
        view.state[key] = buffer
    removed = max(0, int(buffer["length"]) - (length - new))
    buffer["count"] = max(0, int(buffer["count"]) - removed)
    buffer["next"] = (int(buffer["next"]) - removed) % capacity
    taken = queries[:, :, -capacity:]
    slots = (int(buffer["next"]) + torch.arange(int(taken.shape[2]), device=queries.device)) % capacity
    buffer["queries"].index_copy_(2, slots, taken)
    buffer["next"] = (int(buffer["next"]) + int(taken.shape[2])) % capacity
    buffer["count"] = min(capacity, int(buffer["count"]) + new)
    buffer["length"] = length
    return buffered_queries(view.state, key)


def buffered_queries(state: dict[str, Any], key: str = DECODE_QUERIES) -> torch.Tensor:
    """The queries :func:`remember_decode_queries` holds, oldest first (``[batch, heads, n, head_dim]``)."""
    buffer = state[key]
    ring: torch.Tensor = buffer["queries"]
    capacity, count = int(ring.shape[2]), int(buffer["count"])
    order = (int(buffer["next"]) - count + torch.arange(count, device=ring.device)) % capacity
    return ring.index_select(2, order)


def forget_decode_queries(state: dict[str, Any], length: int, key: str = DECODE_QUERIES) -> None:
    """Empty the buffer after a re-plan that leaves the layer ``length`` long (its entries moved)."""
    buffer = state.get(key)
    if buffer is not None:
        buffer["count"], buffer["next"], buffer["length"] = 0, 0, int(length)


def decode_cache_view(
    view: DecodeView, queries: torch.Tensor, n_keep: tuple[int, ...], **view_options: Any
) -> CacheView:
    """The layer of a decode step as a :class:`CacheView`: its whole cache, with ``queries`` of its last entries.

    ``queries`` are the buffered decode queries (:func:`remember_decode_queries`), the step's last;
    ``view_options`` go to the view (``num_layers``).
    """
    return CacheView(
        layer_idx=view.layer_idx,
        keys=view.keys,
        values=view.values,
        queries=queries,
        scaling=view.scaling,
        head_modality=view.head_modality,
        n_keep=n_keep,
        state=view.state,
        **view_options,
    )
