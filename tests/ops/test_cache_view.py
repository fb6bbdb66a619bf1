"""Cache views: statistics over the last entries' queries, per-head modality, carried attention, the decode buffer.

References are the naive float64 softmax of tests/helpers/synthetic.py (queries of the last
``q`` positions = all queries counted from position ``P - q``) and plain Python bookkeeping.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvpress_mm import Compressor, Modality
from kvpress_mm.ops.cache_view import (
    CacheView,
    buffered_queries,
    decode_cache_view,
    forget_decode_queries,
    remember_decode_queries,
)
from kvpress_mm.ops.scoring import attention_column_sums, attention_column_sums_and_density, query_offset
from kvpress_mm.ops.views import DecodeView
from kvpress_mm.strategies import BUILTIN_STRATEGIES
from tests.helpers.synthetic import (
    DTYPES,
    SETTINGS,
    SyntheticCase,
    make_tensors,
    make_view,
    naive_column_sums,
    synthetic_cases,
)
from tests.strategies.test_strategy_properties import configs


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 2e-5) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=2e-5)


def cache_view(case: SyntheticCase, q: int, tensors: dict[str, torch.Tensor], **options: Any) -> CacheView:
    """``case``'s layer as a cache view whose queries are those of its last ``q`` positions."""
    heads = tensors["modality"][:, None, :].expand(-1, case.kv_heads, -1).contiguous()
    return CacheView(
        layer_idx=case.layer_idx,
        keys=tensors["keys"],
        values=tensors["values"],
        queries=tensors["queries"][:, :, case.padded_length - q :],
        scaling=case.head_dim**-0.5,
        head_modality=heads,
        n_keep=case.n_keep,
        **options,
    )


@SETTINGS
@given(case=synthetic_cases(), dtype=DTYPES, data=st.data())
def test_column_sums_of_the_last_queries_match_the_naive_softmax(
    case: SyntheticCase, dtype: torch.dtype, data: st.DataObject
) -> None:
    t = make_tensors(case, dtype)
    p = case.padded_length
    q = data.draw(st.integers(0, p), label="queries")
    start = data.draw(st.integers(0, p), label="query_start")
    chunk_bytes = data.draw(st.sampled_from([1, 37, 4096, 2**22]), label="chunk_bytes")
    key_valid = t["modality"] != Modality.PADDING
    scaling = case.head_dim**-0.5
    queries = t["queries"][:, :, p - q :]
    assert query_offset(queries, t["keys"]) == p - q
    out = attention_column_sums(queries, t["keys"], scaling, key_valid, key_valid, start, chunk_bytes)
    expected = naive_column_sums(t["queries"], t["keys"], scaling, t["modality"], query_start=max(start, p - q))
    _close(out, expected)


@SETTINGS
@given(case=synthetic_cases(), data=st.data())
def test_density_of_the_last_queries_is_that_of_the_same_queries_in_a_full_prompt(
    case: SyntheticCase, data: st.DataObject
) -> None:
    t = make_tensors(case)
    p = case.padded_length
    q = data.draw(st.integers(1, p), label="queries")
    starts = [data.draw(st.integers(0, p), label="start") for _ in range(case.batch)]
    key_valid = t["modality"] != Modality.PADDING
    scaling = case.head_dim**-0.5
    args = (scaling, key_valid)
    sums, density = attention_column_sums_and_density(t["queries"][:, :, p - q :], t["keys"], *args, starts, 0.1)
    full_sums, full_density = attention_column_sums_and_density(
        t["queries"], t["keys"], *args, [max(s, p - q) for s in starts], 0.1
    )
    _close(sums, full_sums)
    _close(density, full_density)


@SETTINGS
@given(case=synthetic_cases(), data=st.data())
def test_cache_view_statistics(case: SyntheticCase, data: st.DataObject) -> None:
    t = make_tensors(case)
    p = case.padded_length
    q = data.draw(st.integers(1, p), label="queries")
    window = data.draw(st.integers(1, 2 * p), label="window")
    carried = torch.rand(case.batch, case.heads, p, generator=torch.Generator().manual_seed(case.seed))
    view = cache_view(case, q, t, carried_attention=carried)
    scaling = case.head_dim**-0.5
    assert view.query_offset == p - q and view.seq_len == p
    # a window longer than the queries uses all of them
    window_expected = naive_column_sums(
        t["queries"], t["keys"], scaling, t["modality"], query_start=max(p - window, p - q)
    )
    _close(view.window_attention_per_head(window), window_expected)
    accumulated = naive_column_sums(t["queries"], t["keys"], scaling, t["modality"], query_start=p - q)
    _close(view.accumulated_attention_per_head(), accumulated + carried.double())
    assert view.accumulated_attention().shape == (case.batch, case.kv_heads, p)


@SETTINGS
@given(case=synthetic_cases(max_length=40), data=st.data())
def test_every_builtin_strategy_plans_a_cache_view_with_every_query_as_its_prefill_view(
    case: SyntheticCase, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from([n for n in BUILTIN_STRATEGIES if n != "vl-cache"]), label="strategy")
    config = data.draw(configs(name), label="config")
    strategy = Compressor.from_name(name, compression_ratio=case.ratio, **config)
    t = make_tensors(case)
    expected = strategy.plan(make_view(case, tensors=t))
    actual = strategy.plan(cache_view(case, case.padded_length, t))
    assert torch.equal(actual.kept_indices, expected.kept_indices)
    assert torch.equal(actual.slot_valid, expected.slot_valid)
    for merged, reference in ((actual.keys, expected.keys), (actual.values, expected.values)):
        assert (merged is None) == (reference is None)
        if merged is not None and reference is not None:
            _close(merged, reference)


def test_row_modality_is_the_lowest_code_over_the_heads() -> None:
    head_modality = torch.tensor(
        [[[3, 1, 1, 2, 0], [3, 0, 1, 2, 1]]], dtype=torch.int8
    )  # [1, 2 heads, 5 slots]: filler, text|image, image, video, image|text
    keys = torch.randn(1, 2, 5, 4)
    view = CacheView(
        layer_idx=0,
        keys=keys,
        values=keys,
        queries=torch.randn(1, 2, 2, 4),
        scaling=0.5,
        head_modality=head_modality,
        n_keep=(2,),
    )
    assert view.modality.tolist() == [[3, 0, 1, 2, 0]]
    assert view.key_valid.tolist() == [[False, True, True, True, True]]
    assert view.prompt_lengths == (4,)
    assert torch.equal(view.head_modality, head_modality)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"head_modality": torch.zeros(1, 1, 5, dtype=torch.int8)}, "head_modality must be"),
        ({"queries": torch.randn(1, 2, 6, 4)}, "queries for 5 cached entries"),
        ({"head_modality": torch.tensor([[[3, 0, 0, 0, 0], [0, 0, 0, 0, 0]]], dtype=torch.int8)}, "filler slot"),
        ({"carried_attention": torch.zeros(1, 2, 4)}, "carried_attention must be"),
    ],
)
def test_cache_view_refuses_inconsistent_tensors(change: dict[str, Any], message: str) -> None:
    keys = torch.randn(1, 2, 5, 4)
    arguments: dict[str, Any] = {
        "layer_idx": 0,
        "keys": keys,
        "values": keys,
        "queries": torch.randn(1, 2, 2, 4),
        "scaling": 0.5,
        "head_modality": torch.zeros(1, 2, 5, dtype=torch.int8),
        "n_keep": (2,),
    }
    with pytest.raises(ValueError, match=message):
        CacheView(**{**arguments, **change})


# -- the decode query buffer ----------------------------------------------------------------


def _decode_view(state: dict[str, Any], length: int, queries: torch.Tensor) -> DecodeView:
    """A decode step's view: ``length`` entries (the step's last), the step's queries."""
    b = int(queries.shape[0])
    keys = torch.randn(b, 1, length, 4)
    q = int(queries.shape[2])
    return DecodeView(
        layer_idx=0,
        keys=keys,
        values=keys,
        queries=queries,
        scaling=0.5,
        slot_valid=torch.ones(b, length, dtype=torch.bool),
        visible=torch.ones(b, q, length, dtype=torch.bool),
        n_keep=(length,) * b,
        state=state,
    )


@SETTINGS
@given(
    capacity=st.integers(1, 6),
    steps=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 3), st.booleans()), min_size=1, max_size=12),
)
def test_the_buffer_holds_the_queries_of_the_last_entries_in_order(
    capacity: int, steps: list[tuple[int, int, bool]]
) -> None:
    """Each step appends ``new`` queries (one per new entry); before it, ``cropped`` entries may have been
    removed (assisted decoding) or the buffer cleared by a re-plan. The buffer always holds the queries
    of the layer's last entries, oldest first: the last ``capacity`` appended, less those whose entries
    were cropped (a crop cannot bring back queries the ring had already dropped)."""
    state: dict[str, Any] = {}
    length = 10
    held: list[float] = []  # the query id of each entry appended since the last clear, in order
    ring: list[float] = []  # what the buffer must hold
    counter = 0
    for new, cropped, replan in steps:
        if replan:
            forget_decode_queries(state, length)
            held, ring = [], []
        cropped = min(cropped, len(held))
        length -= cropped
        held = held[: len(held) - cropped]
        ring = ring[: max(0, len(ring) - cropped)]
        ids = torch.arange(counter, counter + new, dtype=torch.float32)
        counter += new
        queries = ids.view(1, 1, new, 1).expand(2, 3, new, 4).contiguous()  # [B=2, H=3, new, D=4]
        length += new
        out = remember_decode_queries(_decode_view(state, length, queries), capacity)
        held += ids.tolist()
        ring = (ring + ids.tolist())[-capacity:]
        assert out.shape == (2, 3, len(ring), 4)
        assert out[0, 0, :, 0].tolist() == ring == held[len(held) - len(ring) :]
        assert torch.equal(out, buffered_queries(state))


def test_a_decode_cache_view_is_the_whole_step_with_the_buffered_queries() -> None:
    state: dict[str, Any] = {}
    modality = torch.tensor([[[1, 0, 0, 0]]], dtype=torch.int8)
    view = _decode_view(state, 4, torch.randn(1, 2, 1, 4))
    view._head_modality_source = lambda: modality
    buffered = remember_decode_queries(view, 3)
    cache = decode_cache_view(view, buffered, (2,))
    assert cache.keys is view.keys and cache.state is state
    assert cache.query_offset == 3 and cache.n_keep == (2,)
    assert torch.equal(cache.head_modality, modality)


def test_a_decode_view_without_a_modality_source_calls_every_valid_slot_text() -> None:
    view = _decode_view({}, 3, torch.randn(2, 1, 1, 4))
    view.slot_valid = torch.tensor([[False, True, True], [True, True, True]])
    assert view.head_modality.tolist() == [[[3, 0, 0]], [[0, 0, 0]]]
