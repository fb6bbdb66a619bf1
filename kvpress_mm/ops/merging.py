"""LOOK-M's KV merging: evicted entries fold into their most similar kept entry.

For each KV head, each evicted entry ``e`` is assigned to the kept entry ``c`` whose key has
the highest cosine similarity with ``e``'s key; values follow the same assignment. With
``n_c`` entries assigned to ``c`` (pre-merge ``K_c``, ``V_c``), for keys and values alike:

- ``average``:  ``K_c' = (K_c + sum_e K_e) / (1 + n_c)``
- ``pivotal``:  ``K_c' = (K_c + sum_e (K_e + K_c) / 2) / (1 + n_c)``
- ``weighted``: ``K_c' = (K_c + sum_e w_e K_e) / (1 + n_c)`` with ``w_e`` the entry's max cosine
  similarity; only entries with ``w_e`` at least the mean of ``w`` over all evicted entries of
  all KV heads of the layer (and row) are merged, and ``n_c`` counts merged entries only.

Kept entries with nothing assigned are unchanged (bit for bit). Computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from kvpress_mm.ops.plan import CompressionPlan, gather_entries
from kvpress_mm.ops.views import LayerView

MergeMode = Literal["average", "pivotal", "weighted"]

# Bound on one chunk of one head's [evicted, kept] similarity matrix (float32 bytes): one head
# at a time, in chunks that stay in the CPU's caches (measured at 16k tokens: 4 MiB chunks
# 1.2 s per layer, all heads at once in batched matmuls 3.4 s).
SIMILARITY_CHUNK_BYTES = 4 * 2**20

# Kept entries per block of the two-level argmax. torch.max with indices is about ten times
# slower than amax on CPU, so the row maximum is found with amax over blocks, and the index
# with max only over the block maxima and inside the one winning block.
ARGMAX_BLOCK = 128


def assign_evicted(
    evicted_keys: torch.Tensor, kept_keys: torch.Tensor, chunk_bytes: int = SIMILARITY_CHUNK_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Most similar kept entry of every evicted entry, per head.

    Args:
        evicted_keys: ``[H, m, D]``.
        kept_keys: ``[H, n, D]``.
        chunk_bytes: bound on one chunk of one head's similarity matrix (one reused buffer).

    Returns:
        ``(target, similarity)``: ``[H, m]`` long index into the kept entries (the first one
        on ties, as ``argmax``) and ``[H, m]`` float32 cosine similarity to it.

    """
    if (
        evicted_keys.dim() != 3
        or kept_keys.dim() != 3
        or (evicted_keys.shape[0] != kept_keys.shape[0] or evicted_keys.shape[2] != kept_keys.shape[2])
    ):
        raise ValueError(
            f"expected evicted keys [H, m, D] and kept keys [H, n, D] with the same H and D, got "
            f"{tuple(evicted_keys.shape)} and {tuple(kept_keys.shape)}"
        )
    # the assignment is a discrete choice: no gradient (and the out= buffers refuse autograd)
    evicted_keys, kept_keys = evicted_keys.detach(), kept_keys.detach()
    heads, m, dim = evicted_keys.shape
    n = kept_keys.shape[1]
    device = evicted_keys.device
    target = torch.empty(heads, m, dtype=torch.long, device=device)
    similarity = torch.empty(heads, m, dtype=torch.float32, device=device)
    if m == 0 or n == 0:
        return target.zero_(), similarity.zero_()
    block = ARGMAX_BLOCK
    n_blocks = -(-n // block)
    # [H, D, n_blocks * block]: the padding columns repeat kept entry 0, so they can only tie
    # with it and a tie goes to the first occurrence: entry 0 itself
    kept_unit = F.normalize(kept_keys.float(), dim=-1)
    padding = kept_unit[:, :1].expand(-1, n_blocks * block - n, -1)
    kept_t = torch.cat([kept_unit, padding], 1).transpose(1, 2).contiguous()
    evicted_unit = F.normalize(evicted_keys.float(), dim=-1)  # [H, m, D]
    width = n_blocks * block
    rows = max(1, chunk_bytes // (4 * width))
    buffer = torch.empty(min(rows, m) * width, dtype=torch.float32, device=device)
    row_index = torch.arange(min(rows, m), device=device)
    for head in range(heads):
        for start in range(0, m, rows):
            end = min(m, start + rows)
            count = end - start
            sims = buffer[: count * width].view(count, width)
            torch.mm(evicted_unit[head, start:end], kept_t[head], out=sims)
            blocks = sims.view(count, n_blocks, block)
            # the first block holding the row's maximum holds its first occurrence
            best, best_block = blocks.amax(-1).max(-1)
            inside = blocks[row_index[:count], best_block].max(-1).indices
            target[head, start:end] = best_block * block + inside
            similarity[head, start:end] = best
    return target, similarity


def _merged(
    source: torch.Tensor,
    kept: torch.Tensor,
    flat_slots: torch.Tensor,
    weight: torch.Tensor | None,
    count: torch.Tensor,
    pivotal: bool,
) -> torch.Tensor:
    """Merged kept entries ``[H, n, D]`` (float32) of one row.

    ``source`` ``[H, P, D]`` are the row's entries and ``kept`` ``[H, n, D]`` its kept ones;
    ``flat_slots`` ``[H * P]`` is each position's row of the flattened ``[H, n + 1]`` slots (its
    own slot for a kept entry, its target for a merged evicted one, slot ``n``, dropped, for
    entries that do not take part); ``weight`` ``[H, P]`` scales each entry (None: all 1);
    ``count`` ``[H, n]`` is ``n_c``.
    """
    heads, positions, dim = source.shape
    n = kept.shape[1]
    source = source.float()
    if weight is not None:
        source = source * weight[..., None]
    totals = torch.zeros(heads * (n + 1), dim, device=source.device)
    totals.index_add_(0, flat_slots, source.reshape(heads * positions, dim))
    totals = totals.view(heads, n + 1, dim)[:, :n]  # K_c + sum_e w_e K_e
    if not pivotal:
        return totals / (1 + count[..., None])
    # (K_c + sum_e (K_e + K_c) / 2) / (1 + n_c) = K_c / 2 + (K_c + sum_e K_e) / (2 (1 + n_c))
    return kept.float() / 2 + totals / (2 * (1 + count[..., None]))


@dataclass
class _HeadGroup:
    """KV heads of one row that keep equally many entries (all heads of a rectangular plan), and their assignment."""

    heads: slice | torch.Tensor  # which KV heads: all of them (a slice: views, no copies), or [G] long
    first: int  # their first real slot (filler slots come first)
    kept_idx: torch.Tensor  # [G, n] positions of the kept entries
    evicted_idx: torch.Tensor  # [G, m] positions of the evicted real entries, ascending
    target: torch.Tensor  # [G, m] each evicted entry's kept slot
    similarity: torch.Tensor  # [G, m] its cosine similarity to that slot's key


def _head_groups(layer: LayerView, plan: CompressionPlan, merged_keys: torch.Tensor, b: int) -> list[_HeadGroup]:
    """Row ``b``'s heads grouped by how many entries they keep, each group's evicted entries assigned."""
    real_per_head = plan.valid_per_head()[b].sum(-1)  # [H]
    groups = []
    for n in sorted(set(real_per_head.tolist()) - {0}):  # a head that keeps nothing has nothing to merge into
        members = (real_per_head == n).nonzero().squeeze(-1)
        heads: slice | torch.Tensor = slice(None) if members.numel() == layer.kv_heads else members
        first = plan.n_slots - int(n)
        kept_idx = plan.kept_indices[b, heads, first:]  # [G, n]
        is_evicted = layer.key_valid[b].expand(members.numel(), -1).clone()
        is_evicted.scatter_(1, kept_idx, False)
        m = int(is_evicted[0].sum())
        if m == 0:
            continue
        evicted_idx = is_evicted.nonzero()[:, 1].view(members.numel(), m)  # [G, m] ascending
        keys = layer.keys[b, heads]  # [G, P, D]
        kept_k = merged_keys[b, heads, first:]  # the kept keys, gathered already
        evicted_k = gather_entries(keys[None], evicted_idx[None])[0]
        target, similarity = assign_evicted(evicted_k, kept_k)
        groups.append(_HeadGroup(heads, first, kept_idx, evicted_idx, target, similarity))
    return groups


def merge_evicted(layer: LayerView, plan: CompressionPlan, mode: MergeMode) -> CompressionPlan:
    """The plan with every evicted real entry of each row merged into its kept entries.

    The kept set is unchanged; only kept entries that received evicted entries change. In a
    ragged plan (``adakv``: the heads of a row keep different numbers of entries) each head
    merges into its own kept entries; ``weighted``'s threshold is still the mean over all
    evicted entries of all KV heads of the row.
    """
    merged_keys = gather_entries(layer.keys, plan.kept_indices)
    merged_values = gather_entries(layer.values, plan.kept_indices)
    pivotal = mode == "pivotal"
    for b in range(layer.batch_size):
        groups = _head_groups(layer, plan, merged_keys, b)
        if not groups:
            continue
        threshold = torch.cat([g.similarity.flatten() for g in groups]).mean()  # over all KV heads of the row
        for group in groups:
            heads, first, target, similarity = group.heads, group.first, group.target, group.similarity
            g, n = group.kept_idx.shape
            device = target.device
            # each position's slot: kept entries their own, evicted ones their target, padding none (n)
            slot_of = torch.full((g, layer.seq_len), n, dtype=torch.long, device=device)
            slot_of.scatter_(1, group.kept_idx, torch.arange(n, device=device).expand(g, -1))
            weight = None
            if mode == "weighted":
                merged = similarity >= threshold
                slot_of.scatter_(1, group.evicted_idx, torch.where(merged, target, n))
                weight = torch.ones(slot_of.shape, dtype=torch.float32, device=device)
                weight.scatter_(1, group.evicted_idx, similarity)
            else:
                merged = torch.ones_like(similarity, dtype=torch.bool)
                slot_of.scatter_(1, group.evicted_idx, target)
            count = torch.zeros(g, n, device=device).scatter_add_(1, target, merged.float())  # n_c
            # one index_add per tensor over the flattened (head, slot) rows, slot n of each head dropped
            flat_slots = (slot_of + torch.arange(g, device=device)[:, None] * (n + 1)).flatten()
            for out, source in ((merged_keys, layer.keys[b, heads]), (merged_values, layer.values[b, heads])):
                kept = out[b, heads, first:]  # the group's kept entries, gathered above
                out[b, heads, first:] = _merged(source, kept, flat_slots, weight, count, pivotal).to(out.dtype)
    return plan.with_merged(merged_keys, merged_values)
