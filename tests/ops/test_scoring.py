"""Chunked attention statistics against a naive full-softmax reference (synthetic tensors)."""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kvpress_mm import Compressor, Modality
from kvpress_mm.ops.scoring import (
    CHUNK_BYTES,
    _query_chunks,
    attention_column_sums,
    attention_column_sums_and_density,
    attention_with_column_sums,
)
from tests.helpers.synthetic import (
    DTYPES,
    SETTINGS,
    SyntheticCase,
    make_tensors,
    make_view,
    naive_column_sums,
    naive_group_mean,
    naive_h2o_scores,
    naive_snapkv_scores,
    synthetic_cases,
)


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 2e-5, rtol: float = 2e-5) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


@SETTINGS
@given(
    case=synthetic_cases(),
    dtype=DTYPES,
    start_fraction=st.floats(0, 1),
    chunk_bytes=st.one_of(st.sampled_from([1, 37, 4096, CHUNK_BYTES]), st.integers(1, 200_000)),
)
def test_column_sums_match_naive_softmax(
    case: SyntheticCase, dtype: torch.dtype, start_fraction: float, chunk_bytes: int
) -> None:
    t = make_tensors(case, dtype)
    key_valid = t["modality"] != Modality.PADDING
    start = int(start_fraction * case.padded_length)
    scaling = case.head_dim**-0.5
    out = attention_column_sums(t["queries"], t["keys"], scaling, key_valid, key_valid, start, chunk_bytes)
    assert out.dtype == torch.float32
    assert out.shape == (case.batch, case.heads, case.padded_length)
    assert torch.isfinite(out).all()
    expected = naive_column_sums(t["queries"], t["keys"], scaling, t["modality"], query_start=start)
    _close(out, expected)
    # padding keys get exactly zero probability
    assert (out.masked_select(~key_valid[:, None, :]) == 0).all()
    # every counted query's probabilities sum to one
    counted = (key_valid & (torch.arange(case.padded_length) >= start)).sum(-1).double()
    _close(out.double().sum(-1), counted[:, None].expand(-1, case.heads), atol=1e-4, rtol=1e-5)


def _sdpa_reference(t: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
    """torch's SDPA in float64: causal, padding keys hidden, GQA by repeating KV heads; rows that see no key give 0."""
    queries, keys, values = t["queries"].double(), t["keys"].double(), t["values"].double()
    groups = queries.shape[1] // keys.shape[1]
    p = queries.shape[2]
    key_valid = t["modality"] != Modality.PADDING
    visible = torch.ones(p, p, dtype=torch.bool).tril()[None] & key_valid[:, None, :]  # [B, P, P]
    out = torch.nn.functional.scaled_dot_product_attention(
        queries,
        keys.repeat_interleave(groups, dim=1),
        values.repeat_interleave(groups, dim=1),
        attn_mask=visible[:, None],
        scale=scaling,
    )
    return out.masked_fill(~visible.any(-1)[:, None, :, None], 0)


@SETTINGS
@given(
    case=synthetic_cases(),
    dtype=DTYPES,
    chunk_bytes=st.one_of(st.sampled_from([1, 37, 4096, CHUNK_BYTES]), st.integers(1, 200_000)),
    value_dim=st.sampled_from([None, 3]),
)
def test_fused_attention_matches_sdpa_and_column_sums(
    case: SyntheticCase, dtype: torch.dtype, chunk_bytes: int, value_dim: int | None
) -> None:
    t = make_tensors(case, dtype)
    if value_dim is not None:  # value head_dim different from the query/key one
        t["values"] = t["values"][..., :1].expand(-1, -1, -1, value_dim).contiguous()
    key_valid = t["modality"] != Modality.PADDING
    scaling = case.head_dim**-0.5
    output, sums = attention_with_column_sums(
        t["queries"], t["keys"], t["values"], scaling, key_valid, key_valid, chunk_bytes
    )
    dv = t["values"].shape[-1]
    assert output.shape == (case.batch, case.heads, case.padded_length, dv)
    assert output.dtype == dtype
    # the layout transformers' attention functions return: [B, P, Hq, Dv] contiguous, without a copy
    assert output.transpose(1, 2).is_contiguous()
    assert torch.isfinite(output).all()
    expected = _sdpa_reference(t, scaling)
    if dtype == torch.float32:
        _close(output, expected, atol=1e-5, rtol=1e-5)
    else:  # computed in float32, rounded once to the model dtype
        _close(output, expected, atol=1e-2, rtol=1e-2)
    # the same column sums as the lazy path, bit for bit (same chunks, same operations)
    assert sums.dtype == torch.float32
    assert torch.equal(
        sums, attention_column_sums(t["queries"], t["keys"], scaling, key_valid, key_valid, 0, chunk_bytes)
    )
    _close(sums, naive_column_sums(t["queries"], t["keys"], scaling, t["modality"]))


#: Shapes of the allocation tests: small enough for many examples, long enough for several chunks.
CHUNKED_SHAPES = dict(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    groups=st.integers(1, 3),
    length=st.integers(32, 64),
    rows=st.integers(1, 8),
)


def _chunked_case(
    batch: int, kv_heads: int, groups: int, length: int, rows: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Text-only tensors, their key validity, and a chunk budget of ``rows`` query rows per block.

    One block (one batch row and KV head) is at most ``rows`` x L logits of each of its query
    heads; later chunks see fewer keys, so they get more rows, never all L.
    """
    case = SyntheticCase(kv_heads, groups, 8, (length,) * batch, ((0,) * length,) * batch, 0.5, length)
    t = make_tensors(case)
    return t, t["modality"] != Modality.PADDING, 4 * groups * length * rows


@settings(max_examples=15, deadline=None)
@given(**CHUNKED_SHAPES)
def test_fused_attention_never_allocates_full_attention(
    batch: int, kv_heads: int, groups: int, length: int, rows: int
) -> None:
    t, key_valid, chunk_bytes = _chunked_case(batch, kv_heads, groups, length, rows)
    with _AllocationRecorder() as rec:
        output, _ = attention_with_column_sums(
            t["queries"], t["keys"], t["values"], 0.3, key_valid, key_valid, chunk_bytes
        )
    _assert_chunked(rec, batch, kv_heads, groups, length, rows, 0, chunk_bytes)
    _close(output, _sdpa_reference(t, 0.3), atol=1e-5, rtol=1e-5)


@SETTINGS
@given(case=synthetic_cases(), dtype=DTYPES)
def test_h2o_scores_are_group_means_of_column_sums(case: SyntheticCase, dtype: torch.dtype) -> None:
    view = make_view(case, dtype)
    scores = Compressor.from_name("h2o").score(view)  # type: ignore[attr-defined]
    assert scores.dtype == torch.float32
    assert scores.shape == (case.batch, case.kv_heads, case.padded_length)
    expected = naive_h2o_scores(view)
    valid = view.key_valid[:, None, :].expand_as(scores)
    _close(scores[valid], expected[valid])
    # LOOK-M uses the same statistic
    _close(view.accumulated_attention()[valid], expected[valid])
    per_head = naive_column_sums(view.queries, view.keys, view.scaling, view.modality)
    _close(view.accumulated_attention_per_head(), per_head)
    _close(naive_group_mean(per_head, case.kv_heads)[valid], expected[valid])


@SETTINGS
@given(
    case=synthetic_cases(),
    dtype=DTYPES,
    window=st.one_of(st.just(32), st.integers(1, 90)),
    kernel=st.sampled_from([1, 3, 5, 7, 9]),
    pooling=st.sampled_from(["max", "avg"]),
)
def test_snapkv_scores_match_naive(
    case: SyntheticCase, dtype: torch.dtype, window: int, kernel: int, pooling: str
) -> None:
    view = make_view(case, dtype)
    strategy = Compressor.from_name("snapkv", window_size=window, kernel_size=kernel, pooling=pooling)
    scores = strategy.score(view)  # type: ignore[attr-defined]
    assert scores.shape == (case.batch, case.kv_heads, case.padded_length)
    assert torch.isfinite(scores).all()
    expected = naive_snapkv_scores(view, window, kernel, pooling)
    for b in range(case.batch):
        real = view.real_positions(b)
        prefix = real[: max(0, len(real) - window)]
        _close(scores[b][:, prefix], expected[b])


class _AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor produced by an aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.shapes.append(tuple(leaf.shape))
        return out

    @property
    def max_numel(self) -> int:
        return max((int(torch.Size(s).numel()) for s in self.shapes), default=0)


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def _assert_chunked(
    rec: _AllocationRecorder,
    batch: int,
    kv_heads: int,
    groups: int,
    length: int,
    rows: int,
    start: int,
    chunk_bytes: int,
) -> None:
    """No tensor as large as one row's [heads, L, L] matrix, and no [.., L, L] slice of it."""
    heads = kv_heads * groups
    assert rec.max_numel < heads * length * length
    assert rec.max_numel <= max(batch * heads * rows * length, batch * heads * length * 8)
    # A block's logits are also viewed flat, [groups * rows, width]: that view has the shape of an
    # [L, L] matrix when groups * rows == L by coincidence (it holds rows < L queries); allow only that.
    budget = chunk_bytes // (4 * groups)
    flat_blocks = {(groups * (end - first), end) for first, end in _query_chunks(start, length, budget)}
    assert not any(len(s) >= 2 and s[-2:] == (length, length) and s not in flat_blocks for s in rec.shapes)


def test_allocation_recorder_detects_a_full_attention_matrix() -> None:
    # negative control: the recorder does see an [H, L, L] matrix when one is built
    case = SyntheticCase(2, 2, 4, (40,), ((0,) * 40,), 0.5, 3)
    t = make_tensors(case)
    with _AllocationRecorder() as rec:
        naive_column_sums(t["queries"], t["keys"], 1.0, t["modality"])
    assert any(s[-2:] == (40, 40) for s in rec.shapes)


@settings(max_examples=25, deadline=None)
@given(**CHUNKED_SHAPES, start=st.integers(0, 8))
# 3 query heads per KV head and a last chunk of 12 rows: its flat view is [36, 36] (found by hypothesis)
@example(batch=1, kv_heads=2, groups=3, length=36, rows=14, start=3)
def test_column_sums_never_allocate_full_attention(
    batch: int, kv_heads: int, groups: int, length: int, rows: int, start: int
) -> None:
    t, key_valid, chunk_bytes = _chunked_case(batch, kv_heads, groups, length, rows)
    with _AllocationRecorder() as rec:
        out = attention_column_sums(t["queries"], t["keys"], 0.3, key_valid, key_valid, start, chunk_bytes)
    _assert_chunked(rec, batch, kv_heads, groups, length, rows, start, chunk_bytes)
    _close(out, naive_column_sums(t["queries"], t["keys"], 0.3, t["modality"], query_start=start))


def test_strategies_never_allocate_full_attention_on_a_long_prompt() -> None:
    # With the default chunk size the [heads, L, L] matrix (32 MiB here) is 4x one chunk's bound.
    length, heads = 2048, 2
    modality = tuple([0] * 100 + [1] * 1800 + [0] * 148)
    case = SyntheticCase(1, heads, 8, (length,), (modality,), 0.8, 0)
    tensors = make_tensors(case)
    full = heads * length * length
    assert full * 4 >= 4 * CHUNK_BYTES
    for name in ("h2o", "lookm-pivotal", "lookm-weighted", "snapkv"):
        view = make_view(case, tensors=tensors)
        with _AllocationRecorder() as rec:
            plan = Compressor.from_name(name, compression_ratio=0.8).plan(view)
        assert plan.slot_valid.sum() == case.n_keep[0]
        assert rec.max_numel <= CHUNK_BYTES // 4, (name, max(rec.shapes, key=_numel))
        assert not any(len(s) >= 2 and s[-2:] == (length, length) for s in rec.shapes), name


@SETTINGS
@given(
    case=synthetic_cases(),
    dtype=DTYPES,
    data=st.data(),
    threshold=st.sampled_from([0.0, 0.01, 0.2, 1.0]),
    chunk_bytes=st.sampled_from([1, 37, 4096, CHUNK_BYTES]),
)
def test_per_row_column_sums_and_density_match_naive_softmax(
    case: SyntheticCase, dtype: torch.dtype, data: st.DataObject, threshold: float, chunk_bytes: int
) -> None:
    """vl-cache's statistics: column sums from a per-row first query, and the share of significant pairs."""
    t = make_tensors(case, dtype)
    key_valid = t["modality"] != Modality.PADDING
    starts = [data.draw(st.integers(0, case.padded_length - 1)) for _ in range(case.batch)]
    scaling = case.head_dim**-0.5
    sums, density = attention_column_sums_and_density(
        t["queries"], t["keys"], scaling, key_valid, starts, threshold, chunk_bytes
    )
    assert sums.dtype == density.dtype == torch.float32
    assert density.shape == (case.batch, case.heads)
    groups = case.groups
    for b, start in enumerate(starts):
        expected = naive_column_sums(
            t["queries"][b : b + 1], t["keys"][b : b + 1], scaling, t["modality"][b : b + 1], start
        )
        _close(sums[b : b + 1], expected)
        real = [i for i in range(case.padded_length) if key_valid[b, i]]
        for h in range(case.heads):
            significant, pairs = 0, 0
            for qi, q in enumerate(real):
                if q < start:
                    continue
                logits = (
                    t["queries"][b, h, q].double() @ t["keys"][b, h // groups, real[: qi + 1]].double().T
                ) * scaling
                probs = torch.softmax(logits, -1)
                significant += int((probs >= threshold * probs.max() - 1e-6 * (threshold > 0)).sum())
                pairs += qi + 1
            assert abs(float(density[b, h]) - (significant / pairs if pairs else 0.0)) <= 0.02 + 1e-6
