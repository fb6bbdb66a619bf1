"""Synthetic layers for the strategy property tests, and naive float64 references.

Nothing here uses kvpress_mm's scoring code: the references are written independently
(full ``[L, L]`` softmax per head, python loops) so that the tests can catch its mistakes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from hypothesis import settings
from hypothesis import strategies as st

from kvpress_mm import CompressionPlan, LayerView, Modality
from kvpress_mm.ops.budget import n_keep_for

LOOKM_STRATEGIES = ("lookm-evict", "lookm-average", "lookm-pivotal", "lookm-weighted")
MERGING_STRATEGIES = ("lookm-average", "lookm-pivotal", "lookm-weighted")
EVICTION_STRATEGIES = ("random", "streaming", "h2o", "snapkv", "lookm-evict")

PATTERNS = ("text", "image", "span", "mix")

#: Hypothesis settings of the synthetic-layer property tests.
SETTINGS = settings(max_examples=40, deadline=None)
#: Model dtypes the statistics must handle (scores are float32 whatever the dtype).
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@dataclass(frozen=True)
class SyntheticCase:
    """Shapes, row lengths, modality patterns, ratio and a tensor seed for one synthetic layer."""

    kv_heads: int
    groups: int
    head_dim: int
    lengths: tuple[int, ...]
    modality_rows: tuple[tuple[int, ...], ...]  # real positions only, Modality codes
    ratio: float
    seed: int
    layer_idx: int = 0

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def heads(self) -> int:
        return self.kv_heads * self.groups

    @property
    def padded_length(self) -> int:
        return max(self.lengths)

    @property
    def n_keep(self) -> tuple[int, ...]:
        return tuple(n_keep_for(length, self.ratio) for length in self.lengths)


def _modality_row(length: int, pattern: str, span: tuple[int, int], rng: random.Random) -> tuple[int, ...]:
    if pattern == "text":
        return (Modality.TEXT,) * length
    if pattern == "image":
        media = Modality.VIDEO if rng.random() < 0.3 else Modality.IMAGE
        return (media,) * length
    if pattern == "span":
        lo, hi = sorted(span)
        lo, hi = min(lo, length), min(hi, length)
        return tuple(Modality.IMAGE if lo <= i < hi else Modality.TEXT for i in range(length))
    choices = (Modality.TEXT, Modality.IMAGE, Modality.VIDEO)
    return tuple(rng.choice(choices) for _ in range(length))


ratios = st.one_of(
    st.sampled_from([0.0, 0.25, 0.5, 0.8, 0.9, 0.95]),
    st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False),
)


@st.composite
def synthetic_cases(
    draw: st.DrawFn,
    max_batch: int = 3,
    max_length: int = 80,
    ratio: st.SearchStrategy[float] | None = None,
    patterns: tuple[str, ...] = PATTERNS,
) -> SyntheticCase:
    """Hypothesis strategy for :class:`SyntheticCase`."""
    batch = draw(st.integers(1, max_batch))
    lengths = tuple(draw(st.integers(1, max_length)) for _ in range(batch))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        pattern = draw(st.sampled_from(patterns))
        span = (draw(st.integers(0, length)), draw(st.integers(0, length)))
        rows.append(_modality_row(length, pattern, span, rng))
    return SyntheticCase(
        kv_heads=draw(st.integers(1, 3)),
        groups=draw(st.integers(1, 4)),
        head_dim=draw(st.sampled_from([2, 4, 8])),
        lengths=lengths,
        modality_rows=tuple(rows),
        ratio=draw(ratios if ratio is None else ratio),
        seed=seed,
        layer_idx=draw(st.integers(0, 5)),
    )


def modality_map(case: SyntheticCase) -> torch.Tensor:
    """``[B, P]`` int8 modality map, left padded."""
    p = case.padded_length
    rows = [[int(Modality.PADDING)] * (p - len(r)) + [int(c) for c in r] for r in case.modality_rows]
    return torch.tensor(rows, dtype=torch.int8)


def make_tensors(case: SyntheticCase, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Keys, values, queries and modality of ``case`` (padding keys get larger, distracting values)."""
    gen = torch.Generator().manual_seed(case.seed)
    b, p, d = case.batch, case.padded_length, case.head_dim
    keys = torch.randn(b, case.kv_heads, p, d, generator=gen)
    values = torch.randn(b, case.kv_heads, p, d, generator=gen)
    queries = 1.5 * torch.randn(b, case.heads, p, d, generator=gen)
    modality = modality_map(case)
    padding = (modality == Modality.PADDING)[:, None, :, None]
    keys = torch.where(padding, 3 * keys + 2, keys)
    return {
        "keys": keys.to(dtype),
        "values": values.to(dtype),
        "queries": queries.to(dtype),
        "modality": modality,
    }


def make_view(case: SyntheticCase, dtype: torch.dtype = torch.float32, tensors: dict | None = None) -> LayerView:
    """A fresh :class:`LayerView` of ``case`` (a new one every call: views cache statistics)."""
    t = make_tensors(case, dtype) if tensors is None else tensors
    return LayerView(
        layer_idx=case.layer_idx,
        keys=t["keys"],
        values=t["values"],
        queries=t["queries"],
        scaling=case.head_dim**-0.5,
        modality=t["modality"],
        n_keep=case.n_keep,
    )


def real_positions(modality_row: torch.Tensor) -> list[int]:
    """Padded indices of a row's real entries, ascending."""
    return [i for i, c in enumerate(modality_row.tolist()) if c != Modality.PADDING]


def kept_rows(plan: CompressionPlan, b: int) -> list[list[int]]:
    """Per KV head, the kept positions of row ``b``'s valid slots (in slot order; a ragged plan: each head's own)."""
    valid = plan.valid_per_head()[b]
    return [plan.kept_indices[b, h][valid[h]].tolist() for h in range(plan.kept_indices.shape[1])]


# ----------------------------------------------------------------------------- references


def naive_column_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    modality: torch.Tensor,
    query_start: int = 0,
) -> torch.Tensor:
    """``[B, Hq, P]`` float64: full causal softmax per head on the real positions, column sums.

    Query ``i`` (padded index) counts when ``i >= query_start``; query head ``h`` uses KV head
    ``h // groups``.
    """
    b_, hq, p, _ = queries.shape
    groups = hq // keys.shape[1]
    out = torch.zeros(b_, hq, p, dtype=torch.float64)
    for b in range(b_):
        real = real_positions(modality[b])
        if not real:
            continue
        idx = torch.tensor(real)
        length = len(real)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        counted = idx >= query_start
        for h in range(hq):
            q = queries[b, h, idx].double()
            k = keys[b, h // groups, idx].double()
            logits = (q @ k.T) * scaling
            probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
            out[b, h, idx] = probs[counted].sum(0)
    return out


def naive_group_mean(per_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Average consecutive query heads of each KV group: ``[B, Hq, ...]`` -> ``[B, kvH, ...]``."""
    groups = per_head.shape[1] // kv_heads
    return torch.stack([per_head[:, k * groups : (k + 1) * groups].mean(1) for k in range(kv_heads)], dim=1)


def naive_h2o_scores(view: LayerView) -> torch.Tensor:
    """``[B, kvH, P]`` float64 accumulated attention, group-averaged."""
    sums = naive_column_sums(view.queries, view.keys, view.scaling, view.modality)
    return naive_group_mean(sums, view.kv_heads)


def _pool(v: list[float], kernel: int, mode: str) -> list[float]:
    pad = kernel // 2
    out = []
    for j in range(len(v)):
        window = [v[i] for i in range(j - pad, j + pad + 1) if 0 <= i < len(v)]
        if mode == "max":
            out.append(max(window))
        else:  # zero padding counts in the mean
            out.append(sum(window) / kernel)
    return out


def naive_snapkv_scores(view: LayerView, window: int, kernel: int, mode: str) -> list[torch.Tensor]:
    """Per row, ``[kvH, L - window]`` float64 SnapKV scores of the row's prefix (real index)."""
    hq, kvh = view.queries.shape[1], view.kv_heads
    groups = hq // kvh
    result = []
    for b in range(view.batch_size):
        real = real_positions(view.modality[b])
        length = len(real)
        idx = torch.tensor(real)
        prefix = max(0, length - window)
        per_head = []
        for h in range(hq):
            q = view.queries[b, h, idx].double()
            k = view.keys[b, h // groups, idx].double()
            logits = (q @ k.T) * view.scaling
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
            v = probs[length - min(window, length) :].sum(0)[:prefix].tolist()
            per_head.append(_pool(v, kernel, mode) if prefix else [])
        rows = [
            [sum(per_head[k * groups + g][j] for g in range(groups)) / groups for j in range(prefix)]
            for k in range(kvh)
        ]
        result.append(torch.tensor(rows, dtype=torch.float64).reshape(kvh, prefix))
    return result


class CacheLayer:
    """The minimal object :func:`kvpress_mm.cache.surgery.apply_plan` works on."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys
        self.values = values
