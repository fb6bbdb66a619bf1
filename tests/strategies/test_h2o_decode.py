"""H2O's decode-time eviction against a naive reference of the accumulated-score rule."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_mm import Compressor, DecodeView
from kvpress_mm.cache.surgery import apply_plan
from tests.helpers.synthetic import (
    CacheLayer,
    SyntheticCase,
    make_tensors,
    make_view,
    naive_h2o_scores,
    synthetic_cases,
)

TOL = 1e-4


def naive_step_scores(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, slot_valid: torch.Tensor
) -> torch.Tensor:
    """``[B, kvH, kv]`` float64: the single new query's probabilities, averaged over each KV group."""
    b_, hq = queries.shape[:2]
    kvh = keys.shape[1]
    groups = hq // kvh
    out = torch.zeros(b_, kvh, keys.shape[2], dtype=torch.float64)
    for b in range(b_):
        idx = slot_valid[b].nonzero().squeeze(-1)
        for h in range(hq):
            logits = (keys[b, h // groups, idx].double() @ queries[b, h, 0].double()) * scaling
            out[b, h // groups, idx] += torch.softmax(logits, dim=-1) / groups
    return out


@settings(max_examples=40, deadline=None)
@given(
    case=synthetic_cases(ratio=st.floats(0.05, 0.95)),
    window=st.one_of(st.none(), st.integers(0, 2), st.integers(0, 40)),
    steps=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_h2o_decode_eviction(case: SyntheticCase, window: int | None, steps: int, dtype: torch.dtype) -> None:
    tensors = make_tensors(case, dtype)
    view = make_view(case, tensors=tensors)
    h2o = Compressor.from_name("h2o", compression_ratio=case.ratio, window_size=window)
    plan = h2o.plan(view)
    cache = CacheLayer(view.keys.clone(), view.values.clone())
    apply_plan(cache, plan)
    slot_valid = plan.slot_valid.clone()
    n_slots = plan.n_slots

    # reference state: identity (prompt position, or P + step) and accumulated score of every slot
    ids = plan.kept_indices.clone()
    expected = naive_h2o_scores(view).gather(2, plan.kept_indices)
    expected = expected.masked_fill(~slot_valid[:, None, :], float("inf"))
    windows = [min(n // 2 if window is None else window, n) for n in case.n_keep]
    originals_k = {
        (b, h, int(p)): view.keys[b, h, int(p)]
        for b in range(case.batch)
        for h in range(case.kv_heads)
        for p in range(case.padded_length)
    }

    gen = torch.Generator().manual_seed(case.seed + 1)
    for step in range(steps):
        new_id = case.padded_length + step
        new_k = torch.randn(case.batch, case.kv_heads, 1, case.head_dim, generator=gen).to(dtype)
        new_v = torch.randn(case.batch, case.kv_heads, 1, case.head_dim, generator=gen).to(dtype)
        new_q = (1.5 * torch.randn(case.batch, case.heads, 1, case.head_dim, generator=gen)).to(dtype)
        for b in range(case.batch):
            for h in range(case.kv_heads):
                originals_k[b, h, new_id] = new_k[b, h, 0]
        keys = torch.cat([cache.keys, new_k], dim=2)
        values = torch.cat([cache.values, new_v], dim=2)
        all_valid = torch.cat([slot_valid, torch.ones(case.batch, 1, dtype=torch.bool)], dim=-1)
        decode_view = DecodeView(
            layer_idx=case.layer_idx,
            keys=keys,
            values=values,
            queries=new_q,
            scaling=case.head_dim**-0.5,
            slot_valid=all_valid,
            visible=all_valid[:, None, :],
            n_keep=case.n_keep,
            state=view.state,
        )
        decode_plan = h2o.decode_plan(decode_view)
        assert decode_plan is not None
        # the cache stays at n_keep per row; filler slots stay at the front
        assert decode_plan.n_slots == n_slots
        assert torch.equal(decode_plan.slot_valid, slot_valid)
        assert decode_plan.keys is None and decode_plan.values is None

        step_scores = naive_step_scores(new_q, keys, case.head_dim**-0.5, all_valid)
        scores = torch.cat([expected, torch.zeros(case.batch, case.kv_heads, 1, dtype=torch.float64)], -1)
        scores = scores + step_scores
        for b in range(case.batch):
            total, w = n_slots + 1, windows[b]
            n_fill = int((~all_valid[b]).sum())
            for h in range(case.kv_heads):
                kept = decode_plan.kept_indices[b, h].tolist()
                assert all(x < y for x, y in zip(kept, kept[1:]))
                assert kept[:n_fill] == list(range(n_fill)), "filler slots are never evicted"
                evicted = sorted(set(range(total)) - set(kept))
                assert len(evicted) == 1
                e = evicted[0]
                assert all_valid[b, e]
                assert e < total - w, "the window of the most recent entries is kept"
                evictable = [i for i in range(n_fill, total - w)]
                lowest = float(scores[b, h, evictable].min())
                assert float(scores[b, h, e]) <= lowest + TOL, "evicts the lowest accumulated score"
        expected = scores.gather(2, decode_plan.kept_indices)
        ids = torch.cat([ids, torch.full((case.batch, case.kv_heads, 1), new_id)], -1).gather(
            2, decode_plan.kept_indices
        )
        cache = CacheLayer(keys, values)
        apply_plan(cache, decode_plan)
        assert cache.keys.shape[2] == n_slots and cache.keys.dtype == dtype
        for b in range(case.batch):
            for h in range(case.kv_heads):
                for slot in range(n_slots):
                    if slot_valid[b, slot]:
                        ident = int(ids[b, h, slot])
                        assert torch.equal(cache.keys[b, h, slot], originals_k[b, h, ident])


def test_decode_eviction_disabled_or_before_any_plan() -> None:
    case = SyntheticCase(1, 1, 4, (10,), ((0,) * 10,), 0.5, 0)
    tensors = make_tensors(case)
    keys = tensors["keys"]
    decode_view = DecodeView(
        layer_idx=0,
        keys=keys,
        values=tensors["values"],
        queries=tensors["queries"][:, :, -1:],
        scaling=0.5,
        slot_valid=torch.ones(1, 10, dtype=torch.bool),
        visible=torch.ones(1, 1, 10, dtype=torch.bool),
        n_keep=(9,),
        state={},
    )
    assert Compressor.from_name("h2o", compression_ratio=0.5).decode_plan(decode_view) is None
    no_decode = Compressor.from_name("h2o", compression_ratio=0.5, decode_eviction=False)
    view = make_view(case, tensors=tensors)
    no_decode.plan(view)
    decode_view.state = view.state
    assert no_decode.decode_plan(decode_view) is None


def test_new_entry_starts_from_its_own_probability() -> None:
    # Uniform prompt attention (zero queries): column sums are harmonic tails, position j of
    # L=10 scores sum_{i>=j} 1/(i+1); with window 0 the top 5 (positions 0..4) are kept, the
    # lowest being position 4 (~0.646). The new query attends almost only to its own key
    # (probability ~1), so the new entry outscores position 4 and position 4 is evicted.
    length, dim = 10, 4
    gen = torch.Generator().manual_seed(0)
    keys = 0.1 * torch.randn(1, 1, length, dim, generator=gen)
    view = make_view(
        SyntheticCase(1, 1, dim, (length,), ((0,) * length,), 0.5, 0),
        tensors={
            "keys": keys,
            "values": torch.randn(1, 1, length, dim, generator=gen),
            "queries": torch.zeros(1, 1, length, dim),
            "modality": torch.zeros(1, length, dtype=torch.int8),
        },
    )
    h2o = Compressor.from_name("h2o", compression_ratio=0.5, window_size=0)
    plan = h2o.plan(view)
    assert plan.kept_indices.tolist() == [[[0, 1, 2, 3, 4]]]
    new_k = torch.tensor([10.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, dim)
    all_keys = torch.cat([keys[:, :, :5], new_k], dim=2)
    valid = torch.ones(1, 6, dtype=torch.bool)
    decode_view = DecodeView(
        layer_idx=0,
        keys=all_keys,
        values=torch.zeros_like(all_keys),
        queries=new_k.clone(),
        scaling=0.5,
        slot_valid=valid,
        visible=valid[:, None, :],
        n_keep=(5,),
        state=view.state,
    )
    decode_plan = h2o.decode_plan(decode_view)
    assert decode_plan is not None
    assert decode_plan.kept_indices.tolist() == [[[0, 1, 2, 3, 5]]]
