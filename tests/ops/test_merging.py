"""LOOK-M merges against an independent naive reference (python loops, float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvpress_mm import CompressionPlan, Compressor, LayerView
from kvpress_mm.cache.surgery import apply_plan
from kvpress_mm.ops.merging import ARGMAX_BLOCK, assign_evicted
from tests.helpers.synthetic import (
    MERGING_STRATEGIES,
    CacheLayer,
    SyntheticCase,
    make_tensors,
    make_view,
    real_positions,
    synthetic_cases,
)

MODES = {"lookm-average": "average", "lookm-pivotal": "pivotal", "lookm-weighted": "weighted"}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
AMBIGUOUS = 1e-5  # similarity gaps below this make the float32 argmax / threshold a coin toss


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def naive_merge(
    view: LayerView, plan: CompressionPlan, mode: str
) -> tuple[list[list[dict[int, tuple[list[float], list[float]]]]], bool]:
    """Expected merged (key, value) of every kept slot that receives entries, per row and head.

    Returns ``(changed, ambiguous)``: ``changed[b][h]`` maps a slot index to its merged
    ``(key, value)`` as python floats; ``ambiguous`` is True when an assignment or the weighted
    threshold is decided by a difference below float32 precision.
    """
    changed: list[list[dict[int, tuple[list[float], list[float]]]]] = []
    ambiguous = False
    for b in range(view.batch_size):
        real = real_positions(view.modality[b])
        valid = plan.valid_per_head()[b].tolist()  # a ragged plan (adakv): each head its own slots
        slots_of = [[i for i, v in enumerate(head) if v] for head in valid]
        # (head, evicted position, target slot, similarity) for every evicted entry of the row
        assignments: list[tuple[int, int, int, float]] = []
        for h in range(view.kv_heads):
            kept = {int(plan.kept_indices[b, h, i]): i for i in slots_of[h]}
            if not kept:  # a head that keeps nothing (adakv) merges nothing
                continue
            keys = view.keys[b, h].double().tolist()
            for e in real:
                if e in kept:
                    continue
                sims = sorted(((_cosine(keys[e], keys[c]), slot) for c, slot in kept.items()), reverse=True)
                if len(sims) > 1 and sims[0][0] - sims[1][0] < AMBIGUOUS:
                    ambiguous = True
                assignments.append((h, e, sims[0][1], sims[0][0]))
        if mode == "weighted" and assignments:
            mean = sum(a[3] for a in assignments) / len(assignments)
            if any(abs(a[3] - mean) < AMBIGUOUS for a in assignments):
                ambiguous = True
            assignments = [a for a in assignments if a[3] >= mean]
        row: list[dict[int, tuple[list[float], list[float]]]] = []
        for h in range(view.kv_heads):
            keys = view.keys[b, h].double().tolist()
            values = view.values[b, h].double().tolist()
            merged = {}
            for slot in slots_of[h]:
                c = int(plan.kept_indices[b, h, slot])
                sources = [(e, w) for hh, e, s, w in assignments if hh == h and s == slot]
                if not sources:
                    continue
                out = []
                for table in (keys, values):
                    acc = list(table[c])
                    for e, w in sources:
                        for d in range(len(acc)):
                            if mode == "average":
                                acc[d] += table[e][d]
                            elif mode == "pivotal":
                                acc[d] += (table[e][d] + table[c][d]) / 2
                            else:
                                acc[d] += w * table[e][d]
                    out.append([x / (1 + len(sources)) for x in acc])
                merged[slot] = (out[0], out[1])
            row.append(merged)
        changed.append(row)
    return changed, ambiguous


@settings(max_examples=50, deadline=None)
@given(
    case=synthetic_cases(max_length=48),
    name=st.sampled_from(MERGING_STRATEGIES),
    window=st.one_of(st.none(), st.integers(0, 60)),
    keep_all_text=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]),
)
def test_merges_match_naive_reference(
    case: SyntheticCase, name: str, window: int | None, keep_all_text: bool, dtype: torch.dtype
) -> None:
    tensors = make_tensors(case, dtype)
    config = {"compression_ratio": case.ratio, "window_size": window, "keep_all_text": keep_all_text}
    evict_plan = Compressor.from_name("lookm-evict", **config).plan(make_view(case, tensors=tensors))
    view = make_view(case, tensors=tensors)
    plan = Compressor.from_name(name, **config).plan(view)

    # exactly lookm-evict's kept set
    assert torch.equal(plan.kept_indices, evict_plan.kept_indices)
    assert torch.equal(plan.slot_valid, evict_plan.slot_valid)
    assert plan.keys is not None and plan.values is not None
    assert plan.keys.shape == (*plan.kept_indices.shape, case.head_dim)
    assert plan.values.shape == plan.keys.shape

    changed, ambiguous = naive_merge(view, plan, MODES[name])
    assume(not ambiguous)
    tol = TOLERANCE[dtype]
    cache = CacheLayer(view.keys.clone(), view.values.clone())
    apply_plan(cache, plan)
    assert cache.keys.dtype == dtype and cache.values.dtype == dtype
    assert torch.isfinite(cache.keys.float()).all() and torch.isfinite(cache.values.float()).all()
    for b in range(case.batch):
        for h in range(case.kv_heads):
            for slot in range(plan.n_slots):
                if not plan.slot_valid[b, slot]:
                    assert (cache.keys[b, h, slot] == 0).all() and (cache.values[b, h, slot] == 0).all()
                    continue
                position = int(plan.kept_indices[b, h, slot])
                if slot not in changed[b][h]:  # nothing assigned (or merged): bit-exact original
                    assert torch.equal(cache.keys[b, h, slot], view.keys[b, h, position])
                    assert torch.equal(cache.values[b, h, slot], view.values[b, h, position])
                    continue
                key, value = changed[b][h][slot]
                expected_key = torch.tensor(key, dtype=torch.float64)
                expected_value = torch.tensor(value, dtype=torch.float64)
                torch.testing.assert_close(cache.keys[b, h, slot].double(), expected_key, atol=tol, rtol=tol)
                torch.testing.assert_close(cache.values[b, h, slot].double(), expected_value, atol=tol, rtol=tol)


def test_merge_reference_sees_a_real_change() -> None:
    # the merged rows differ from the originals: the property above is not vacuous
    case = SyntheticCase(2, 2, 4, (30, 20), ((0,) * 10 + (1,) * 20, (1,) * 20), 0.8, 5)
    for name in MERGING_STRATEGIES:
        view = make_view(case)
        plan = Compressor.from_name(name, compression_ratio=0.8).plan(view)
        changed, ambiguous = naive_merge(view, plan, MODES[name])
        assert not ambiguous
        assert all(changed[b][h] for b in range(2) for h in range(2)), name
        assert plan.keys is not None
        originals = view.keys.gather(2, plan.kept_indices[..., None].expand(-1, -1, -1, 4))
        assert not torch.equal(plan.keys, originals), name


def test_weighted_merge_drops_below_mean_entries() -> None:
    # Hand-made row: kept keys e1 and e2; evicted keys close to e1 (merged) and far from both (dropped).
    keys = torch.tensor([[[1.0, 0.0], [0.99, 0.141], [-0.6, -0.8], [1.0, 0.0], [0.0, 1.0]]])[None]  # [1, 1, 5, 2]
    values = torch.arange(10, dtype=torch.float32).reshape(1, 1, 5, 2)
    queries = torch.zeros(1, 1, 5, 2)  # uniform causal attention
    view = LayerView(
        layer_idx=0,
        keys=keys,
        values=values,
        queries=queries,
        scaling=1.0,
        modality=torch.zeros(1, 5, dtype=torch.int8),
        n_keep=(2,),
    )
    plan = Compressor.from_name("lookm-weighted", compression_ratio=0.6, window_size=2).plan(view)
    assert plan.kept_indices.tolist() == [[[3, 4]]]  # the window
    # evicted: 0 (sim 1 to slot 0), 1 (sim ~0.99 to slot 0), 2 (sim -0.6 to slot 0, -0.8 to slot 1)
    sims = [1.0, _cosine([0.99, 0.141], [1.0, 0.0]), -0.6]
    mean = sum(sims) / 3
    assert sims[2] < mean <= sims[1]
    expected_key = (keys[0, 0, 3] + sims[0] * keys[0, 0, 0] + sims[1] * keys[0, 0, 1]) / 3
    expected_value = (values[0, 0, 3] + sims[0] * values[0, 0, 0] + sims[1] * values[0, 0, 1]) / 3
    assert plan.keys is not None and plan.values is not None
    torch.testing.assert_close(plan.keys[0, 0, 0], expected_key)
    torch.testing.assert_close(plan.values[0, 0, 0], expected_value)
    assert torch.equal(plan.keys[0, 0, 1], keys[0, 0, 4])  # nothing merged into slot 1
    assert torch.equal(plan.values[0, 0, 1], values[0, 0, 4])


@pytest.mark.parametrize("chunk_bytes", [1, 64, 4096, 2**30])
def test_assign_evicted_is_the_same_for_any_chunking(chunk_bytes: int) -> None:
    """Per-head chunks of the similarity matrix give exactly the one-shot argmax and max."""
    generator = torch.Generator().manual_seed(3)
    evicted, kept = torch.randn(4, 300, 16, generator=generator), torch.randn(4, 70, 16, generator=generator)
    sims = torch.nn.functional.normalize(evicted, dim=-1) @ torch.nn.functional.normalize(kept, dim=-1).transpose(1, 2)
    target, similarity = assign_evicted(evicted, kept, chunk_bytes=chunk_bytes)
    assert torch.equal(target, sims.argmax(-1))
    assert torch.allclose(similarity, sims.max(-1).values, atol=1e-6)


@pytest.mark.parametrize("n_kept", [1, ARGMAX_BLOCK - 1, ARGMAX_BLOCK, ARGMAX_BLOCK + 1, 2 * ARGMAX_BLOCK + 72])
def test_assign_evicted_breaks_ties_to_the_first_kept_entry(n_kept: int) -> None:
    """Exact ties (one-hot keys) go to the first kept entry, across argmax blocks and padding."""

    dim = 8
    generator = torch.Generator().manual_seed(n_kept)
    # kept entries repeat directions 0..6, so most directions occur in several argmax blocks;
    # direction 7 only late (in the last block, twice): its first occurrence is far from entry 0
    kept_dirs = torch.randint(0, dim - 1, (2, n_kept), generator=generator)
    if n_kept >= 3:
        kept_dirs[:, -3] = kept_dirs[:, -1] = dim - 1
    evicted_dirs = torch.randint(0, dim, (2, 500), generator=generator)
    kept = torch.nn.functional.one_hot(kept_dirs, dim).float() * 3.0  # norms do not matter
    evicted = torch.nn.functional.one_hot(evicted_dirs, dim).float() * 0.5
    target, similarity = assign_evicted(evicted, kept)
    for h in range(2):
        for i, direction in enumerate(evicted_dirs[h].tolist()):
            matches = (kept_dirs[h] == direction).nonzero().flatten().tolist()
            # a direction no kept entry has: every similarity is 0, the first entry wins
            assert int(target[h, i]) == (matches[0] if matches else 0)
            assert float(similarity[h, i]) == (1.0 if matches else 0.0)
    if n_kept >= 3:
        assert (target == n_kept - 3).any()  # the late direction was assigned


@pytest.mark.parametrize(("evicted", "kept"), [((2, 5, 8), (3, 4, 8)), ((2, 5, 8), (2, 4, 6)), ((5, 8), (4, 8))])
def test_assign_evicted_refuses_mismatched_shapes(evicted: tuple[int, ...], kept: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="same H and D"):
        assign_evicted(torch.randn(*evicted), torch.randn(*kept))
