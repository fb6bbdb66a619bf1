"""Attention statistics computed in query chunks: never a ``[heads, L, L]`` tensor.

All statistics are float32 whatever the model dtype (bf16 scores collapse into ties).
"""

from __future__ import annotations

import torch

# Upper bound on the float32 logits of one query chunk. Small enough that the compression
# step's peak memory stays close to the prefill's own, large enough for efficient matmuls.
CHUNK_BYTES = 8 * 2**20


def _grouped_queries(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, Hq, q, D]`` -> ``[B, kvH, groups, q, D]`` (query head h uses KV head h // groups)."""
    b, hq, q, d = queries.shape
    return queries.reshape(b, kv_heads, hq // kv_heads, q, d)


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
    keys32 = keys.float()
    out = torch.zeros(b, kvh, groups, p, dtype=torch.float32, device=queries.device)
    rows_per_chunk = max(1, chunk_bytes // (4 * b * hq * max(p, 1)))
    positions = torch.arange(p, device=queries.device)
    neg_inf = torch.tensor(float("-inf"), device=queries.device)
    for start in range(query_start, p, rows_per_chunk):
        end = min(p, start + rows_per_chunk)
        q = _grouped_queries(queries[:, :, start:end].float(), kvh)  # [B, kvH, g, c, D]
        k = keys32[:, :, :end]  # causal: queries < end see keys < end only
        logits = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)).mul_(scaling)  # [B, kvH, g, c, e]
        visible = positions[None, :end] <= positions[start:end, None]  # [c, e]
        visible = visible[None] & key_valid[:, None, :end]  # [B, c, e]
        logits = torch.where(visible[:, None, None], logits, neg_inf)
        probs = torch.softmax(logits, dim=-1)
        # Queries that do not count, or see no key at all (left padding), contribute nothing.
        counted = query_valid[:, start:end] & visible.any(-1)  # [B, c]
        probs = probs.masked_fill(~counted[:, None, None, :, None], 0.0)
        out[..., :end] += probs.sum(dim=3)
    return out.reshape(b, hq, p)


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
