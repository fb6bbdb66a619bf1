"""What a strategy sees of one layer: tensors, the modality map, budgets and lazy statistics."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvpress_mm.errors import InvalidPlanError
from kvpress_mm.modality import Modality
from kvpress_mm.ops.scoring import attention_column_sums, decode_attention, group_mean

#: A transform of the scores a selection ranks (``mixkv``): ``(layer, scores [B, kvH, P] float32,
#: each row's protected window) -> [B, kvH, P]``. See :meth:`LayerView.with_selection`.
SelectionTransform = Callable[["LayerView", torch.Tensor, Sequence[int]], torch.Tensor]


class _LayerTensors:
    """What both views hold: one layer's cache tensors, the queries attending to them, budgets, state."""

    def __init__(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor,
        scaling: float,
        n_keep: tuple[int, ...],
        state: dict[str, Any],
    ) -> None:
        self.layer_idx = layer_idx
        self.keys = keys
        self.values = values
        self.queries = queries
        self.scaling = float(scaling)
        self.n_keep = n_keep
        self.state = state

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return int(self.keys.shape[0])

    @property
    def kv_heads(self) -> int:
        """Number of KV heads."""
        return int(self.keys.shape[1])


class LayerView(_LayerTensors):
    """One decoder layer right after its prompt prefill attention.

    Attributes:
        layer_idx: index of the decoder layer.
        keys: ``[batch, kv_heads, seq, head_dim]`` post-RoPE keys of the prompt (as cached).
        values: ``[batch, kv_heads, seq, head_dim]``.
        queries: ``[batch, heads, seq, head_dim]`` post-RoPE queries of the prompt. On a
            :class:`~kvpress_mm.ops.cache_view.CacheView` (a whole cache re-planned while
            decoding or between prefill chunks) they are the queries of the last ``q <= seq``
            entries only; the statistics below handle both.
        scaling: the attention module's softmax scale.
        modality: ``[batch, seq]`` int8 :class:`~kvpress_mm.Modality` codes (per KV head:
            :attr:`head_modality`).
        n_keep: entries each row keeps (its own budget; rows differ when padded). A wrapper
            that gives layers or modalities other budgets hands its inner strategy a view with
            other budgets (:meth:`with_budgets`).
        num_layers: the text decoder's number of layers (``None`` when the view was built
            outside a session and nobody said): per-layer budgets (``pyramid``, ``vl-cache``)
            are computed from ``layer_idx`` and ``num_layers``.
        prompt_lengths: real (non-padding) prompt length of each row.
        key_valid: ``[batch, seq]`` bool, False for padding positions.
        state: a dict that lives with this layer's cache for the rest of the generation;
            strategies that act while decoding (``h2o``) keep their statistics here.
        call_state: a dict shared by the views of every layer of the same prefill call (and
            only that call): strategies that decide a layer's budget from the layers before it
            (``vl-cache``'s online allocation) keep their running totals here.

    The constructor's optional ``accumulated_attention_per_head`` (``[batch, heads, seq]``
    float32) provides :meth:`accumulated_attention_per_head` precomputed: the session passes
    the column sums its fused prefill attention produced for strategies that declare
    ``needs_accumulated_attention``.

    In a left-padded batch, ``seq`` is the padded length and each row's real entries are its
    last ``prompt_lengths[b]`` positions. Attention statistics are computed on first use and
    cached on the view, in float32, in query chunks (never a ``[heads, seq, seq]`` matrix).

    Examples:
        A score that prefers text entries, then recent ones (inside
        :meth:`ScoredCompressor.score <kvpress_mm.ScoredCompressor.score>`):

        ```python
        from kvpress_mm import Modality

        def score(self, layer):
            recency = torch.arange(layer.seq_len, device=layer.keys.device).float()  # [seq]
            is_text = (layer.modality == Modality.TEXT).float()  # [batch, seq]
            scores = is_text * layer.seq_len + recency  # [batch, seq]
            return scores[:, None, :].expand(-1, layer.kv_heads, -1)  # [batch, kv_heads, seq]
        ```

        Attention-based scores come from the view's statistics:
        ``layer.accumulated_attention()`` (H2O's column sums, ``[batch, kv_heads, seq]``) or
        ``layer.window_attention_per_head(32)`` (SnapKV's observation window, per query head).

    """

    def __init__(
        self,
        *,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor,
        scaling: float,
        modality: torch.Tensor,
        n_keep: tuple[int, ...],
        state: dict[str, Any] | None = None,
        accumulated_attention_per_head: torch.Tensor | None = None,
        num_layers: int | None = None,
        call_state: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(layer_idx, keys, values, queries, scaling, n_keep, {} if state is None else state)
        self.modality = modality
        self.num_layers = num_layers
        self.call_state: dict[str, Any] = {} if call_state is None else call_state
        self.key_valid = modality != Modality.PADDING  # [B, P]
        self.prompt_lengths = tuple(int(n) for n in self.key_valid.sum(-1).tolist())
        self._cache: dict[Any, torch.Tensor] = {}
        self._selection: SelectionTransform | None = None
        if accumulated_attention_per_head is not None:
            # already computed with the prefill attention (the session's fused path)
            self._cache[("accumulated", 0)] = accumulated_attention_per_head

    @property
    def seq_len(self) -> int:
        """Padded prompt length (columns of the cache)."""
        return int(self.keys.shape[2])

    @property
    def head_modality(self) -> torch.Tensor:
        """``[batch, kv_heads, seq]`` int8: the modality of each KV head's entry at each position.

        After a prefill every KV head holds the same entries (``modality`` for each head). A
        compressed cache that is re-planned (a :class:`~kvpress_mm.ops.cache_view.CacheView`)
        may hold another entry in each KV head at the same slot, since selections are per KV
        head: strategies whose choice depends on modality read this, not ``modality``.
        """
        return self.modality[:, None, :].expand(-1, self.kv_heads, -1)

    @property
    def query_offset(self) -> int:
        """Position of the first query: 0 at a prefill, ``seq - q`` on a cache view (queries of the last ``q``)."""
        return self.seq_len - int(self.queries.shape[2])

    def real_positions(self, row: int) -> torch.Tensor:
        """Positions of the row's real (non-padding) entries, ascending."""
        return self.key_valid[row].nonzero().squeeze(-1)

    def with_budgets(self, n_keep: Sequence[int]) -> LayerView:
        """The same layer with other per-row budgets (what a budget wrapper hands its inner strategy).

        The new view shares everything else: tensors, the attention statistics already computed
        (and those computed later, through either view), ``state``, ``call_state`` and the
        selection transform.
        """
        budgets = tuple(int(n) for n in n_keep)
        if len(budgets) != self.batch_size or any(n < 0 for n in budgets):
            raise InvalidPlanError(
                f"with_budgets needs one non-negative budget per row ({self.batch_size}), got {budgets}"
            )
        view = copy.copy(self)  # shallow: the statistics cache and the state dicts are shared
        view.n_keep = budgets
        return view

    def with_selection(self, transform: SelectionTransform) -> LayerView:
        """The same layer whose selections rank ``transform(layer, scores, windows)`` instead of the scores.

        A strategy's scores still decide *how many* entries each part gets where a wrapper
        allocates by scores; the transform decides *which* entries fill each budget (``mixkv``).
        The framework's selections (``kvpress_mm.ops.selection.select_top_with_window``,
        LOOK-M's text-first selection, the budget wrappers') apply it through
        :meth:`selection_scores`.
        """
        view = copy.copy(self)
        view._selection = transform
        return view

    @property
    def has_selection_transform(self) -> bool:
        """True when selections on this view rank transformed scores (:meth:`with_selection`)."""
        return self._selection is not None

    def selection_scores(self, scores: torch.Tensor, windows: Sequence[int]) -> torch.Tensor:
        """The scores a selection ranks: ``scores`` itself, or its transform (:meth:`with_selection`).

        Args:
            scores: ``[batch, kv_heads, seq]`` float32 scores of the strategy that selects.
            windows: each row's protected window, already clamped to the row's budget: the
                candidates are the row's real entries before it.

        """
        if self._selection is None:
            return scores
        return self._selection(self, scores, windows)

    @property
    def queries(self) -> torch.Tensor:
        """``[batch, heads, seq, head_dim]`` post-RoPE queries of the prompt (until :meth:`drop_queries`)."""
        if self._queries is None:
            raise InvalidPlanError(
                f"layer {self.layer_idx}'s prompt queries were released after observe(): a strategy that "
                "defers its plans must compute the attention statistics it needs in observe()"
            )
        return self._queries

    @queries.setter
    def queries(self, value: torch.Tensor) -> None:
        self._queries: torch.Tensor | None = value

    def drop_queries(self) -> None:
        """Release the prompt queries and the cached statistics (they are the view's largest tensors).

        The session calls it on the views of strategies that plan all layers at the end of the
        prefill (:attr:`~kvpress_mm.Compressor.defers_plans`): what they need from the queries
        must be computed in :meth:`~kvpress_mm.Compressor.observe`. Afterwards reading
        :attr:`queries` or an attention statistic raises :class:`~kvpress_mm.errors.InvalidPlanError`.
        """
        self._queries = None
        self._cache.clear()

    def accumulated_attention_per_head(self) -> torch.Tensor:
        """``[batch, heads, seq]`` float32: sum over all prompt queries of ``A[h, i, j]``."""
        key = ("accumulated", 0)
        if key not in self._cache:
            self._cache[key] = attention_column_sums(
                self.queries, self.keys, self.scaling, self.key_valid, self.key_valid
            )
        return self._cache[key]

    def accumulated_attention(self) -> torch.Tensor:
        """``[batch, kv_heads, seq]`` float32: accumulated attention averaged over each KV group."""
        return group_mean(self.accumulated_attention_per_head(), self.kv_heads)

    def window_attention_per_head(self, window_size: int) -> torch.Tensor:
        """``[batch, heads, seq]`` float32: sum over the last ``window_size`` prompt queries.

        A window longer than the queries there are (a cache view's) uses all of them.
        """
        key = ("window", window_size)
        if key not in self._cache:
            start = max(0, self.seq_len - window_size)
            self._cache[key] = attention_column_sums(
                self.queries, self.keys, self.scaling, self.key_valid, self.key_valid, query_start=start
            )
        return self._cache[key]


class DecodeView(_LayerTensors):
    """One decoder layer right after a decode step's attention (for decode-time strategies).

    Attributes:
        layer_idx: index of the decoder layer.
        keys: ``[batch, kv_heads, kv, head_dim]`` the whole cache, the new entries last.
        values: likewise.
        queries: ``[batch, heads, q, head_dim]`` the step's post-RoPE queries.
        scaling: softmax scale.
        slot_valid: ``[batch, kv]`` bool, False for filler slots.
        visible: ``[batch, q, kv]`` bool, which keys each new query saw.
        n_keep: each row's budget.
        state: the layer's strategy state (see :class:`LayerView`).

    The constructor's optional ``head_modality`` is a function returning the
    ``[batch, kv_heads, kv]`` modality of every slot (computed on first use of
    :attr:`head_modality`: most decode steps never need it).

    """

    def __init__(
        self,
        *,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor,
        scaling: float,
        slot_valid: torch.Tensor,
        visible: torch.Tensor,
        n_keep: tuple[int, ...],
        state: dict[str, Any],
        head_modality: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(layer_idx, keys, values, queries, scaling, n_keep, state)
        self.slot_valid = slot_valid
        self.visible = visible
        self._attention: torch.Tensor | None = None
        self._head_modality_source = head_modality
        self._head_modality: torch.Tensor | None = None

    @property
    def head_modality(self) -> torch.Tensor:
        """``[batch, kv_heads, kv]`` int8 :class:`~kvpress_mm.Modality` of each KV head's entry at each slot.

        Prompt entries keep their own modality, decoded entries are ``TEXT``, filler slots
        ``PADDING``. Without a source (a view built outside a session), every valid slot is ``TEXT``.
        """
        if self._head_modality is None:
            if self._head_modality_source is not None:
                self._head_modality = self._head_modality_source()
            else:
                text = torch.full(self.slot_valid.shape, int(Modality.TEXT), dtype=torch.int8, device=self.keys.device)
                text = text.masked_fill(~self.slot_valid, int(Modality.PADDING))
                self._head_modality = text[:, None, :].expand(-1, self.kv_heads, -1)
        return self._head_modality

    def attention(self) -> torch.Tensor:
        """``[batch, heads, q, kv]`` float32 softmax probabilities of the step's queries."""
        if self._attention is None:
            self._attention = decode_attention(self.queries, self.keys, self.scaling, self.visible)
        return self._attention
