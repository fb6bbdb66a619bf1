"""Attention statistics computed in query chunks: never a ``[heads, L, L]`` tensor.

All statistics are float32 whatever the model dtype (bf16 scores collapse into ties).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# Upper bound on the float32 logits of one query chunk (of one batch row and KV head). Small
# enough that the compression step's peak memory stays close to the prefill's own and that the
# passes over a chunk mostly hit the CPU's caches, large enough for efficient matmuls.
CHUNK_BYTES = 4 * 2**20


def _grouped_queries(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, Hq, q, D]`` -> ``[B, kvH, groups, q, D]`` (query head h uses KV head h // groups)."""
    b, hq, q, d = queries.shape
    return queries.reshape(b, kv_heads, hq // kv_heads, q, d)


def _query_chunks(query_start: int, length: int, budget: int) -> list[tuple[int, int]]:
    """``(start, end)`` query chunks whose causal logits ``rows x end`` each fit in ``budget`` elements.

    Rows see keys ``< end`` only, so later chunks (wider) get fewer rows: every chunk but the
    last is about ``budget`` elements, which halves the number of chunks of a full prompt
    compared with a fixed row count.
    """
    chunks = []
    start = max(0, query_start)
    while start < length:
        # the largest rows with rows * (start + rows) <= budget, at least one
        rows = max(1, int((math.sqrt(start * start + 4 * budget) - start) / 2))
        while rows > 1 and rows * (start + rows) > budget:
            rows -= 1
        end = min(length, start + rows)
        chunks.append((start, end))
        start = end
    return chunks


@dataclass(frozen=True)
class _Block:
    """One block of causal softmax probabilities (see :class:`_CausalSoftmaxChunks`)."""

    row: int  # batch row
    head: int  # KV head: query heads ``head * groups ... head * groups + groups - 1``
    start: int  # first query
    end: int  # last query + 1; the block sees keys ``first ... end - 1``
    first: int  # the row's first real key: earlier keys are left padding, never seen
    probs: torch.Tensor  # [groups, end - start, end - first] float32


class _CausalSoftmaxChunks:
    """The causal softmax probabilities of a prompt's queries, one block at a time.

    Iterating yields a :class:`_Block` per batch row, query chunk and KV head: the
    probabilities of the chunk's queries (all query heads of that KV head) over the keys they
    see. Every block lives in one reused buffer of at most ``chunk_bytes`` (a block's
    probabilities are valid until the next block is produced); chunks get as many query rows
    as fit, so later chunks (wider) get fewer rows. A chunk fitting in the CPU's caches
    makes the passes over it (logits, softmax, column sums, ``probs @ V``) cheaper. The queries
    may be those of the last positions only (:func:`query_offset`); positions are the keys'.

    ``query_start`` is the first query of every row, or one per row.

    Each block is one matmul for the logits, the causal mask on the chunk's diagonal block
    only (earlier keys are all visible), and an in-place softmax. A row's left padding (keys
    before its first real key) is skipped, not masked: its queries see no key and get no
    block. Padding keys after the first real one (never made by the session, which refuses
    them) are masked.
    """

    def __init__(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        scaling: float,
        key_valid: torch.Tensor,
        query_start: int | Sequence[int],
        chunk_bytes: int,
    ) -> None:
        # statistics for a discrete selection: no gradient (and out= buffers refuse autograd)
        queries, keys = queries.detach(), keys.detach()
        b, hq, _, _ = queries.shape
        p = int(keys.shape[2])
        # queries may be fewer than the keys: they are those of the last positions (a cache view)
        self.offset = query_offset(queries, keys)
        given = [query_start] * b if isinstance(query_start, int) else [int(s) for s in query_start]
        starts = [max(start, self.offset) for start in given]
        self.queries, self.scaling, self.key_valid = queries, scaling, key_valid
        self.kv_heads = int(keys.shape[1])
        self.groups = hq // self.kv_heads
        budget = max(1, chunk_bytes // (4 * self.groups))  # logits per query head of one block
        has_key = key_valid.any(-1).tolist()
        firsts = key_valid.int().argmax(-1).tolist()  # the first True of each row
        # per batch row: (first real key, padding after it?, query chunks)
        self.plans: list[tuple[int, bool, list[tuple[int, int]]]] = []
        for row in range(b):
            if not has_key[row]:
                self.plans.append((p, False, []))
                continue
            first = int(firsts[row])
            holes = not bool(key_valid[row, first:].all())
            chunks = _query_chunks(max(starts[row], first) - first, p - first, budget)
            self.plans.append((first, holes, [(start + first, end + first) for start, end in chunks]))
        blocks = [(first, start, end) for first, _, chunks in self.plans for start, end in chunks]
        self.max_rows = max((end - start for _, start, end in blocks), default=0)
        if not blocks:
            return
        self.keys_t = keys.float().transpose(-1, -2)  # [B, kvH, D, P]
        largest = max(self.groups * (end - start) * (end - first) for first, start, end in blocks)
        self.buffer = torch.empty(largest, dtype=torch.float32, device=queries.device)
        self.future_keys = torch.ones(self.max_rows, self.max_rows, dtype=torch.bool, device=queries.device).triu_(1)

    def __iter__(self) -> Iterator[_Block]:
        d = self.queries.shape[-1]
        kvh, groups = self.kv_heads, self.groups
        # finite, so that no row can get NaN; exp underflows to 0
        masked = torch.finfo(torch.float32).min
        for row, (first, holes, chunks) in enumerate(self.plans):
            # head by head, so that the head's keys and values stay in the CPU's caches over its
            # chunks (all heads' keys and values of a long prompt do not fit)
            for head in range(kvh):
                heads = slice(head * groups, (head + 1) * groups)
                for start, end in chunks:
                    rows, width = end - start, end - first
                    chunk_queries = self.queries[row, heads, start - self.offset : end - self.offset]
                    q = (chunk_queries.float() * self.scaling).reshape(groups * rows, d)
                    logits = self.buffer[: groups * rows * width].view(groups * rows, width)
                    torch.matmul(q, self.keys_t[row, head, :, first:end], out=logits)
                    logits = logits.view(groups, rows, width)
                    # causal: queries < end see keys < end only, and inside the chunk no key after themselves
                    logits[..., start - first :].masked_fill_(self.future_keys[:rows, :rows], masked)
                    if holes:
                        logits.masked_fill_(~self.key_valid[row, first:end], masked)
                    # in place (ATen's softmax.out, row by row): no second chunk-sized buffer
                    probs = torch._softmax(logits, -1, False, out=logits)
                    yield _Block(row, head, start, end, first, probs)


def query_offset(queries: torch.Tensor, keys: torch.Tensor) -> int:
    """Position of the first query: ``queries [B, Hq, q, D]`` are those of the last ``q`` of the ``keys``' positions.

    At a prefill every position has its query (offset 0); on a cache view (a cache re-planned
    with the queries of its latest calls) the queries are those of the last ``q`` entries.
    """
    q, p = int(queries.shape[2]), int(keys.shape[2])
    if q > p:
        raise ValueError(f"{q} queries for {p} keys: queries must belong to the last keys' positions")
    return p - q


def _counted_queries(key_valid: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` float: 1 for a query that is valid and sees at least one real key (itself or an earlier one)."""
    return (query_valid & (key_valid.cumsum(-1) > 0)).float()


def _add_column_sums(sums: torch.Tensor, counted: torch.Tensor, block: _Block) -> None:
    """Add the counted queries of ``block`` to ``sums`` ``[B, kvH, groups, P]``."""
    groups, rows, _ = block.probs.shape
    # queries that do not count get weight 0 (their probabilities are finite)
    weight = counted[block.row, None, None, block.start : block.end].expand(groups, 1, rows)
    target = sums[block.row, block.head].view(groups, 1, -1)[..., block.first : block.end]
    target.baddbmm_(weight, block.probs)


def attention_column_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor,
    query_valid: torch.Tensor,
    query_start: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """Sum over queries ``i >= query_start`` of the causal softmax probabilities ``A[h, i, j]``.

    Query rows are processed in chunks, per batch row and KV head, each in one reused buffer
    of at most ``chunk_bytes``: one matmul for the logits (keys from the row's first real one
    up to the chunk's last query only), the causal mask on the chunk's diagonal block only
    (earlier keys are all visible), an in-place softmax, and one matmul that adds up the
    queries that count. Chunks get as many rows as fit (later rows see more keys), so a full
    prompt takes about ``2 * B * Hq * P**2 / chunk_bytes`` blocks (256 for 8 query heads and
    8k tokens at 4 MiB).

    Args:
        queries: ``[B, Hq, q, D]`` post-RoPE queries of the last ``q <= P`` positions (``q = P``
            at a prefill: every position's query; fewer on a cache view, see
            :func:`query_offset`). Query ``i`` sees the keys ``j <= P - q + i``.
        keys: ``[B, kvH, P, D]`` post-RoPE keys.
        scaling: the attention module's softmax scale.
        key_valid: ``[B, P]`` bool, False for padding keys (they get zero probability).
        query_valid: ``[B, P]`` bool, by position, False for queries that do not count (padding).
        query_start: first query position that counts (SnapKV's observation window); positions
            before the first query never count.
        chunk_bytes: bound on one block's float32 logits.

    Returns:
        ``[B, Hq, P]`` float32 column sums, per query head.

    """
    b, hq = int(queries.shape[0]), int(queries.shape[1])
    p = int(keys.shape[2])
    kvh = int(keys.shape[1])
    sums = torch.zeros(b, kvh, hq // kvh, p, dtype=torch.float32, device=queries.device)
    counted = _counted_queries(key_valid, query_valid)
    for block in _CausalSoftmaxChunks(queries, keys, scaling, key_valid, query_start, chunk_bytes):
        _add_column_sums(sums, counted, block)
    return sums.view(b, hq, p)


def attention_column_sums_and_density(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor,
    query_starts: Sequence[int],
    threshold: float,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums of each row's queries from ``query_starts[row]`` on, and how dense their attention is.

    VL-Cache's statistics of the post-vision queries, from the same chunked softmax as
    :func:`attention_column_sums`. A probability counts as *significant* when it is at least
    ``threshold`` times its query's largest probability (over the keys the query sees).

    Args:
        queries: ``[B, Hq, P, D]`` post-RoPE queries of the prompt.
        keys: ``[B, kvH, P, D]`` post-RoPE keys of the prompt.
        scaling: the attention module's softmax scale.
        key_valid: ``[B, P]`` bool, False for padding keys (they get zero probability).
        query_starts: per row, the first (padded) query position that counts.
        threshold: the significance threshold relative to each query's largest probability, in ``[0, 1]``.
        chunk_bytes: bound on one block's float32 logits.

    Returns:
        ``(sums, density)``: ``sums`` ``[B, Hq, P]`` float32, the column sums over the counted
            queries; ``density`` ``[B, Hq]`` float32, the significant (query, visible key) pairs
            over all (query, visible key) pairs of the counted queries (0 for a row without any).

    """
    b, hq = int(queries.shape[0]), int(queries.shape[1])
    p = int(keys.shape[2])
    kvh = int(keys.shape[1])
    groups = hq // kvh
    sums = torch.zeros(b, kvh, groups, p, dtype=torch.float32, device=queries.device)
    significant = torch.zeros(b, kvh, groups, dtype=torch.float64, device=queries.device)
    counted = _counted_queries(key_valid, key_valid)
    chunks = _CausalSoftmaxChunks(queries, keys, scaling, key_valid, query_starts, chunk_bytes)
    for block in chunks:
        _add_column_sums(sums, counted, block)
        rows, width = block.end - block.start, block.end - block.first
        probs = block.probs
        is_significant = probs >= threshold * probs.amax(-1, keepdim=True)
        # only what the query sees: with threshold 0 a hidden key (probability 0) would count
        is_significant[..., block.start - block.first :] &= ~chunks.future_keys[:rows, :rows]
        is_significant &= key_valid[block.row, block.first : block.end].expand(width)
        is_significant &= counted[block.row, block.start : block.end, None].bool()
        significant[block.row, block.head] += is_significant.sum((1, 2)).double()
    # visible keys of each counted query: the real keys up to and including itself
    seen = key_valid.long().cumsum(-1).double() * counted.double()  # [B, P]
    positions = torch.arange(p, device=queries.device)
    # positions before the first query (a cache view's cached entries) have no query to count
    offset = query_offset(queries, keys)
    starts = torch.as_tensor([max(int(s), offset) for s in query_starts], device=queries.device)
    pairs = (seen * (positions[None, :] >= starts[:, None])).sum(-1)  # [B]
    density = significant.view(b, hq) / pairs.clamp(min=1)[:, None]
    return sums.view(b, hq, p), density.float()


def attention_with_column_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor,
    query_valid: torch.Tensor,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's causal attention output and, from the same probabilities, its column sums.

    One pass over the blocks of :func:`attention_column_sums` (same chunks, same buffer, same
    in-place softmax): each block's probabilities are multiplied by the values (``probs @ V``,
    one matmul per block, the query heads of a KV group sharing its values without copies)
    and added up into the column sums. This is the prefill attention of a layer whose
    strategy needs the all-query statistics (``h2o``, LOOK-M), so they cost no second pass.
    Inference only: no gradient flows to the inputs.

    Args:
        queries: ``[B, Hq, P, D]`` post-RoPE queries of the prompt.
        keys: ``[B, kvH, P, D]`` post-RoPE keys of the prompt.
        values: ``[B, kvH, P, Dv]``.
        scaling: the attention module's softmax scale.
        key_valid: ``[B, P]`` bool, False for padding keys (they get zero probability).
        query_valid: ``[B, P]`` bool, False for queries that do not count in the sums (padding).
        chunk_bytes: bound on one block's float32 logits.

    Returns:
        ``(output, sums)``: ``output`` ``[B, Hq, P, Dv]`` in the queries' dtype (computed in
            float32), a transposed view of a contiguous ``[B, P, Hq, Dv]`` tensor (the layout
            transformers' attention functions return); a query that sees no key at all (left
            padding) gets zeros, as ``torch``'s SDPA gives it. ``sums`` ``[B, Hq, P]`` float32
            are :func:`attention_column_sums` over all queries, bit for bit.

    """
    b, hq, p, _ = queries.shape
    kvh, dv = int(keys.shape[1]), int(values.shape[-1])
    groups = hq // kvh
    sums = torch.zeros(b, kvh, groups, p, dtype=torch.float32, device=queries.device)
    output = torch.empty(b, p, hq, dv, dtype=queries.dtype, device=queries.device)
    heads_first = output.transpose(1, 2)  # [B, Hq, P, Dv] view
    counted = _counted_queries(key_valid, query_valid)
    chunks = _CausalSoftmaxChunks(queries, keys, scaling, key_valid, 0, chunk_bytes)
    for row, (first, _, _) in enumerate(chunks.plans):
        # queries before the row's first real key see no key (left padding): zeros, like SDPA
        heads_first[row, :, :first].zero_()
    values_f = values.detach().float()
    out_buffer = torch.empty(groups * chunks.max_rows * dv, dtype=torch.float32, device=queries.device)
    for block in chunks:
        _add_column_sums(sums, counted, block)
        rows = block.end - block.start
        block_out = out_buffer[: groups * rows * dv].view(groups * rows, dv)
        probs = block.probs.view(groups * rows, block.end - block.first)
        torch.matmul(probs, values_f[block.row, block.head, block.first : block.end], out=block_out)
        heads = slice(block.head * groups, (block.head + 1) * groups)
        heads_first[block.row, heads, block.start : block.end].copy_(block_out.view(groups, rows, dv))
    return heads_first, sums.view(b, hq, p)


def decode_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    visible: torch.Tensor,
) -> torch.Tensor:
    """Softmax probabilities of a few new queries over the whole cache, float32.

    Args:
        queries: ``[B, Hq, q, D]``.
        keys: ``[B, kvH, kv, D]``.
        scaling: softmax scale.
        visible: ``[B, q, kv]`` bool, which keys each query sees.

    Returns:
        ``[B, Hq, q, kv]`` float32.

    """
    b, hq, q, _ = queries.shape
    kvh = keys.shape[1]
    g = _grouped_queries(queries.float(), kvh)
    logits = torch.matmul(g, keys.float().unsqueeze(2).transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
    return torch.softmax(logits, dim=-1).reshape(b, hq, q, -1)


def group_mean(per_query_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Average the query heads that share a KV head: ``[B, Hq, ...]`` -> ``[B, kvH, ...]``."""
    b, hq = per_query_head.shape[:2]
    return per_query_head.reshape(b, kv_heads, hq // kv_heads, *per_query_head.shape[2:]).mean(2)
