"""Compression plans: which prompt entries each KV head keeps, and how evicted entries merge."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CompressionPlan:
    """What a strategy decided for one layer.

    Rows of a batch may keep different numbers of entries (their prompts differ in length);
    the cache is rectangular, so shorter rows get *filler* slots at the front, marked invalid
    in ``slot_valid`` and never attended to.

    A *ragged* plan (``head_valid`` set, ``adakv``) lets the KV heads of a row keep different
    numbers of entries: ``kept_indices`` is padded to the longest head, each head's filler
    slots come first, and ``head_valid`` says which slots of each head are real. The session
    stores such a layer head by head (:class:`~kvpress_mm.cache.ragged.RaggedLayer`): the
    padding exists only in the index tensor, never in the stored keys and values. A plan whose
    heads keep equally many entries in every row is rectangular (``head_valid`` is ``None``,
    ``ragged_plan`` makes it so).

    Attributes:
        kept_indices: ``[batch, kv_heads, n_slots]`` long, positions (in the layer's current
            cache) of the kept entries, ascending over each row's valid slots.
        slot_valid: ``[batch, n_slots]`` bool, False for filler slots (always at the front).
        keys: optional ``[batch, kv_heads, n_slots, head_dim]`` replacement keys for the kept
            slots (merging strategies); ``None`` keeps the original rows bit-exact.
        values: like ``keys``, for the values.
        head_valid: optional ``[batch, kv_heads, n_slots]`` bool, False for the filler slots of
            each head (always at the front of the head); ``None`` for rectangular plans. When
            set, ``slot_valid`` is ``head_valid.any(1)``.

    """

    kept_indices: torch.Tensor
    slot_valid: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    head_valid: torch.Tensor | None = None

    @property
    def n_slots(self) -> int:
        """Length of the cache after the plan is applied."""
        return int(self.kept_indices.shape[-1])

    @property
    def is_ragged(self) -> bool:
        """True when the KV heads of a row keep different numbers of entries (``head_valid`` is set)."""
        return self.head_valid is not None

    def valid_per_head(self) -> torch.Tensor:
        """``[batch, kv_heads, n_slots]`` bool: which slots of each head are real (ragged or not)."""
        if self.head_valid is not None:
            return self.head_valid
        return self.slot_valid[:, None, :].expand_as(self.kept_indices)

    def with_merged(self, keys: torch.Tensor, values: torch.Tensor) -> CompressionPlan:
        """The same kept set with merged keys and values."""
        return CompressionPlan(self.kept_indices, self.slot_valid, keys, values, self.head_valid)


def stack_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-row kept indices ``[kv_heads, n_b]`` into ``[batch, kv_heads, n_max]``.

    Shorter rows are left-filled with index 0 (filler slots, marked invalid).
    Returns ``(kept_indices, slot_valid)``.
    """
    n_max = max(int(r.shape[-1]) for r in rows)
    heads = int(rows[0].shape[0])
    device = rows[0].device
    kept = torch.zeros(len(rows), heads, n_max, dtype=torch.long, device=device)
    valid = torch.zeros(len(rows), n_max, dtype=torch.bool, device=device)
    for b, row in enumerate(rows):
        n = int(row.shape[-1])
        if n:
            kept[b, :, n_max - n :] = row
            valid[b, n_max - n :] = True
    return kept, valid


def ragged_plan(rows: list[list[torch.Tensor]]) -> CompressionPlan:
    """A plan from each row's kept positions per KV head (``rows[b][h]``: ascending 1-D long).

    Heads of a row may keep different numbers of entries: every head is left-filled with
    filler slots (index 0, invalid) up to the longest head of the batch. If every head of each
    row keeps as many entries as the row's other heads, the plan is rectangular
    (``head_valid`` is ``None``) and takes the session's usual path.

    Examples:
        >>> plan = ragged_plan([[torch.tensor([0, 2]), torch.tensor([1])]])
        >>> plan.kept_indices.tolist(), plan.head_valid.tolist(), plan.slot_valid.tolist()
        ([[[0, 2], [0, 1]]], [[[True, True], [False, True]]], [[True, True]])
        >>> ragged_plan([[torch.tensor([0, 2]), torch.tensor([1, 3])]]).head_valid is None
        True

    """
    n_max = max((int(head.numel()) for row in rows for head in row), default=0)
    batch, heads = len(rows), len(rows[0])
    device = rows[0][0].device
    kept = torch.zeros(batch, heads, n_max, dtype=torch.long, device=device)
    head_valid = torch.zeros(batch, heads, n_max, dtype=torch.bool, device=device)
    for b, row in enumerate(rows):
        for h, positions in enumerate(row):
            n = int(positions.numel())
            if n:
                kept[b, h, n_max - n :] = positions
                head_valid[b, h, n_max - n :] = True
    slot_valid = head_valid.any(1)
    uniform = all(len({int(head.numel()) for head in row}) == 1 for row in rows)
    return CompressionPlan(kept, slot_valid, head_valid=None if uniform else head_valid)


def gather_entries(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor [B, H, P, D]`` at ``index [B, H, n]`` (positions along ``P``) -> ``[B, H, n, D]``.

    The same as ``tensor.gather(2, index[..., None].expand(-1, -1, -1, D))``, but a contiguous
    ``tensor`` is read whole rows at a time (``index_select`` on its flattened entries), several
    times faster on CPU: it runs at every decode step of ``h2o``.
    """
    b, h, p, d = tensor.shape
    if not tensor.is_contiguous():
        return tensor.gather(2, index[..., None].expand(-1, -1, -1, d))
    offsets = torch.arange(0, b * h * p, p, device=index.device).view(b, h, 1)
    rows = tensor.view(b * h * p, d).index_select(0, (index + offsets).flatten())
    return rows.view(b, h, index.shape[-1], d)
