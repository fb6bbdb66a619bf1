"""Attention statistics computed in query chunks: never a ``[heads, L, L]`` tensor.

All statistics are float32 whatever the model dtype (bf16 scores collapse into ties).
"""

from __future__ import annotations

import math

import torch

# Upper bound on the float32 logits of one query chunk. Small enough that the compression
# step's peak memory stays close to the prefill's own, large enough for efficient matmuls.
CHUNK_BYTES = 8 * 2**20


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

    Query rows are processed in chunks, each in one reused buffer of at most ``chunk_bytes``:
    one matmul for the logits (keys up to the chunk's last query only), the causal mask on the
    chunk's diagonal block only (earlier keys are all visible), the padding mask only when
    there is padding, an in-place softmax, and one matmul that adds up the rows that count.
    Chunks get as many rows as fit (later rows see more keys), so a full prompt takes about
    ``2 * B * Hq * P**2 / chunk_bytes`` chunks (128 for 8 heads and 8k tokens at 8 MiB).

    Args:
        queries: ``[B, Hq, P, D]`` post-RoPE queries of the prompt.
        keys: ``[B, kvH, P, D]`` post-RoPE keys of the prompt.
        scaling: the attention module's softmax scale.
        key_valid: ``[B, P]`` bool, False for padding keys (they get zero probability).
        query_valid: ``[B, P]`` bool, False for queries that do not count (padding).
        query_start: first query position that counts (SnapKV's observation window).
        chunk_bytes: bound on one chunk's float32 logits.

    Returns:
        ``[B, Hq, P]`` float32 column sums, per query head.

    """
    b, hq, p, d = queries.shape
    kvh = keys.shape[1]
    groups = hq // kvh
    out = torch.zeros(b, kvh * groups, p, dtype=torch.float32, device=queries.device)
    chunks = _query_chunks(query_start, p, max(1, chunk_bytes // (4 * b * hq)))
    if not chunks:
        return out
    keys_t = keys.float().transpose(-1, -2)  # [B, kvH, D, P]
    buffer = torch.empty(
        max(b * hq * (end - start) * end for start, end in chunks), dtype=torch.float32, device=queries.device
    )
    # finite, so that a query that sees no key at all (left padding) gets no NaN; exp underflows to 0
    masked = torch.finfo(torch.float32).min
    padded = not bool(key_valid.all())
    # a query counts if it is valid and sees at least one real key (itself or an earlier one)
    counted = (query_valid & (key_valid.cumsum(-1) > 0) if padded else query_valid).float()
    max_rows = max(end - start for start, end in chunks)
    future_keys = torch.ones(max_rows, max_rows, dtype=torch.bool, device=queries.device).triu_(1)
    for start, end in chunks:
        rows = end - start
        q = (queries[:, :, start:end].float() * scaling).reshape(b, kvh, groups * rows, d)
        logits = buffer[: b * hq * rows * end].view(b, kvh, groups * rows, end)
        torch.matmul(q, keys_t[..., :end], out=logits)
        logits = logits.view(b, kvh, groups, rows, end)
        # causal: queries < end see keys < end only, and inside the chunk no key after themselves
        logits[..., start:end].masked_fill_(future_keys[:rows, :rows], masked)
        if padded:
            logits.masked_fill_(~key_valid[:, None, None, None, :end], masked)
        # in place (ATen's softmax.out, row by row): no second chunk-sized buffer
        probs = torch._softmax(logits, -1, False, out=logits)
        # rows that do not count get weight 0 (their probabilities are finite)
        weight = counted[:, None, start:end].expand(b, hq, rows).reshape(b * hq, 1, rows)
        target = out.view(b * hq, 1, p)[..., :end]
        target.baddbmm_(weight, probs.view(b * hq, rows, end))
    return out


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
