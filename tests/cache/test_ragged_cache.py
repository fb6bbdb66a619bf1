"""RaggedLayer: each KV head stored on its own, exactly its kept entries, appended in place.

Property tests build ragged plans over random keys and values, apply them, and drive the layer
through random sequences of what transformers and the session do to a cache layer (appends of
any length, beam reorders, row selection and repetition, crop, marking left-padded new tokens)
against a naive per-head reference (a ``torch.cat`` per append, indexing per row change).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvpress_mm.cache.growing import GrowingLayer
from kvpress_mm.cache.ragged import RaggedLayer, apply_ragged_plan
from kvpress_mm.cache.surgery import apply_plan, kv_bytes
from kvpress_mm.errors import UnsupportedCacheError
from kvpress_mm.ops.plan import CompressionPlan, ragged_plan

DIM = 3
SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def ragged_cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]], bool]:
    """``(keys, values [B, H, P, D], kept positions rows[b][h], merged)`` with per-head counts that differ."""
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(2, 4))
    length = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, length, DIM, generator=generator)
    values = torch.randn(batch, heads, length, DIM, generator=generator)
    rows = []
    for _ in range(batch):
        row = []
        for _ in range(heads):
            count = draw(st.integers(0, length))
            row.append(torch.randperm(length, generator=generator)[:count].sort().values)
        rows.append(row)
    if all(len({int(p.numel()) for p in row}) == 1 for row in rows):
        # make it ragged: one head of the first row one entry shorter or longer
        first = rows[0][0]
        rows[0][0] = first[1:] if first.numel() else torch.tensor([0])
    return keys, values, rows, draw(st.booleans())


def _layer(keys: torch.Tensor, values: torch.Tensor, growing: bool) -> DynamicLayer:
    if growing:
        return GrowingLayer.from_tensors(keys, values)
    layer = DynamicLayer()
    layer.update(keys, values)
    return layer


def _merged(plan: CompressionPlan, seed: int = 1) -> CompressionPlan:
    generator = torch.Generator().manual_seed(seed)
    shape = (*plan.kept_indices.shape, DIM)
    return plan.with_merged(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))


Reference = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per head: keys, values [B, n, D], valid [B, n]


def _reference(keys: torch.Tensor, values: torch.Tensor, plan: CompressionPlan) -> Reference:
    """Per head: the plan's slots that some row fills, gathered naively, fillers zeroed."""
    assert plan.head_valid is not None
    reference = []
    for h in range(keys.shape[1]):
        used = [s for s in range(plan.n_slots) if bool(plan.head_valid[:, h, s].any())]
        head_keys = torch.zeros(keys.shape[0], len(used), DIM)
        head_values = torch.zeros_like(head_keys)
        valid = torch.zeros(keys.shape[0], len(used), dtype=torch.bool)
        for b in range(keys.shape[0]):
            for i, s in enumerate(used):
                if plan.head_valid[b, h, s]:
                    source_k = plan.keys if plan.keys is not None else None
                    position = int(plan.kept_indices[b, h, s])
                    head_keys[b, i] = source_k[b, h, s] if source_k is not None else keys[b, h, position]
                    head_values[b, i] = plan.values[b, h, s] if plan.values is not None else values[b, h, position]
                    valid[b, i] = True
        reference.append((head_keys, head_values, valid))
    return reference


def _assert_matches(layer: RaggedLayer, reference: Reference) -> None:
    assert layer.kv_heads == len(reference)
    for h, (ref_keys, ref_values, ref_valid) in enumerate(reference):
        entries = layer.head(h)
        assert torch.equal(entries.keys, ref_keys)
        assert torch.equal(entries.values, ref_values)
        valid = entries.valid if entries.valid is not None else torch.ones(ref_valid.shape, dtype=torch.bool)
        assert torch.equal(valid, ref_valid)
    assert layer.head_lengths == [ref[0].shape[1] for ref in reference]
    assert layer.get_seq_length() == max(layer.head_lengths)
    assert layer.get_mask_sizes(2) == (layer.get_seq_length() + 2, 0)
    element = reference[0][0].element_size()
    expected_bytes = sum(2 * ref[0].shape[0] * ref[0].shape[1] * DIM * element for ref in reference)
    assert layer.stored_bytes() == kv_bytes(layer) == expected_bytes


@SETTINGS
@given(ragged_cases(), st.booleans())
def test_a_ragged_plan_stores_each_head_in_exactly_its_entries(
    case: tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]], bool], growing: bool
) -> None:
    keys, values, rows, merged = case
    plan = ragged_plan(rows)
    assert plan.head_valid is not None
    if merged:
        plan = _merged(plan)
    layer = _layer(keys, values, growing)
    apply_plan(layer, plan)  # the dispatch the session uses
    assert isinstance(layer, RaggedLayer)
    _assert_matches(layer, _reference(keys, values, plan))
    # storage of exactly the entries: no headroom before the first append, nothing of the old tensors kept
    assert layer.allocated_bytes() == layer.stored_bytes() + sum(
        0 if layer.head(h).valid is None else layer.head_lengths[h] * keys.shape[0] for h in range(layer.kv_heads)
    )
    assert not any(isinstance(v, torch.Tensor) and v.numel() == keys.numel() for v in vars(layer).values())
    # each row's real entries: exactly the plan's, per head
    for b, row in enumerate(rows):
        for h, positions in enumerate(row):
            entries = layer.head(h)
            valid = (
                entries.valid[b] if entries.valid is not None else torch.ones(entries.keys.shape[1], dtype=torch.bool)
            )
            assert int(valid.sum()) == positions.numel()
            if not merged:
                assert torch.equal(entries.keys[b][valid], keys[b, h, positions])


OPERATIONS = st.one_of(
    st.tuples(st.just("update"), st.integers(1, 5)),
    st.tuples(st.just("update"), st.just(1)),
    st.tuples(st.just("padded-update"), st.integers(1, 4)),
    st.tuples(st.just("crop"), st.integers(0, 3)),
    st.tuples(st.just("reorder"), st.integers(0, 10**6)),
    st.tuples(st.just("select"), st.integers(0, 10**6)),
    st.tuples(st.just("repeat"), st.integers(1, 3)),
)


def _operate(layer: RaggedLayer, reference: Reference, operation: tuple[str, int], seed: int) -> Reference:
    name, parameter = operation
    generator = torch.Generator().manual_seed(seed)
    batch = reference[0][0].shape[0]
    if name in ("update", "padded-update"):
        new_keys = torch.randn(batch, len(reference), parameter, DIM, generator=generator)
        new_values = torch.randn(batch, len(reference), parameter, DIM, generator=generator)
        returned = layer.update(new_keys, new_values)
        assert returned[0] is new_keys and returned[1] is new_values  # only the new entries go back
        new_valid = torch.ones(batch, parameter, dtype=torch.bool)
        if name == "padded-update":
            new_valid = torch.arange(parameter)[None] >= torch.randint(
                0, parameter + 1, (batch, 1), generator=generator
            )
            layer.mark_invalid_tail(new_valid)
        return [
            (torch.cat([k, new_keys[:, h]], 1), torch.cat([v, new_values[:, h]], 1), torch.cat([ok, new_valid], 1))
            for h, (k, v, ok) in enumerate(reference)
        ]
    if name == "crop":
        remove = min(parameter, min(layer.head_lengths))
        layer.crop(-remove)
        return [
            (k[:, : k.shape[1] - remove], v[:, : v.shape[1] - remove], ok[:, : ok.shape[1] - remove])
            for k, v, ok in reference
        ]
    if name == "repeat":
        layer.batch_repeat_interleave(parameter)
        return [tuple(t.repeat_interleave(parameter, 0) for t in head) for head in reference]  # type: ignore[misc]
    if name == "reorder":
        rows = torch.randint(0, batch, (batch,), generator=generator)
        layer.reorder_cache(rows)
    else:
        rows = torch.randperm(batch, generator=generator)[: max(1, parameter % batch + 1)]
        layer.batch_select_indices(rows)
    return [tuple(t[rows] for t in head) for head in reference]  # type: ignore[misc]


@SETTINGS
@given(ragged_cases(), st.lists(OPERATIONS, max_size=8), st.integers(0, 3))
def test_appends_and_row_changes_match_a_naive_per_head_cache(
    case: tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]], bool],
    operations: list[tuple[str, int]],
    headroom: int,
) -> None:
    keys, values, rows, _ = case
    layer = _layer(keys, values, growing=False)
    plan = ragged_plan(rows)
    apply_ragged_plan(layer, plan, headroom=headroom)
    assert isinstance(layer, RaggedLayer)
    layer.claim(lambda: True)
    reference = _reference(keys, values, plan)
    for step, operation in enumerate(operations):
        reference = _operate(layer, reference, operation, seed=step)
        _assert_matches(layer, reference)


def test_appends_write_in_place_after_one_reallocation() -> None:
    keys = torch.randn(1, 3, 10, DIM)
    plan = ragged_plan([[torch.arange(6), torch.arange(2), torch.arange(4)]])
    layer = apply_ragged_plan(_layer(keys, keys.clone(), growing=False), plan, headroom=4)
    layer.claim(lambda: True)
    assert layer.head_lengths == [6, 2, 4] and layer.allocated_bytes() == layer.stored_bytes()
    layer.update(torch.randn(1, 3, 1, DIM), torch.randn(1, 3, 1, DIM))
    assert layer.reallocations == 1
    pointers = [layer.head(h).keys.data_ptr() for h in range(3)]
    for _ in range(4):  # the headroom: in place
        layer.update(torch.randn(1, 3, 1, DIM), torch.randn(1, 3, 1, DIM))
    assert layer.reallocations == 1
    assert [layer.head(h).keys.data_ptr() for h in range(3)] == pointers
    assert layer.head_lengths == [11, 7, 9]
    layer.update(torch.randn(1, 3, 1, DIM), torch.randn(1, 3, 1, DIM))
    assert layer.reallocations == 2


def _claimed_layer() -> RaggedLayer:
    keys = torch.randn(2, 2, 5, DIM)
    plan = ragged_plan([[torch.arange(3), torch.arange(1)], [torch.arange(2), torch.arange(4)]])
    return apply_ragged_plan(_layer(keys, keys.clone(), growing=False), plan)


def test_a_ragged_layer_refuses_appends_no_session_reads() -> None:
    """Outside a compressor session the model's own attention would see the new entries only: an error."""
    layer = _claimed_layer()
    new = torch.randn(2, 2, 1, DIM)
    with pytest.raises(UnsupportedCacheError, match="with compressor\\(model\\)"):
        layer.update(new, new)
    layer.claim(lambda: False)  # the session that claimed it has ended
    with pytest.raises(UnsupportedCacheError, match="ragged per-head layers"):
        layer.update(new, new)
    assert layer.head_lengths == [3, 4]  # nothing was appended
    layer.claim(lambda: True)
    layer.update(new, new)
    assert layer.head_lengths == [4, 5]
    with pytest.raises(UnsupportedCacheError, match="cannot append"):
        layer.update(torch.randn(1, 2, 1, DIM), torch.randn(1, 2, 1, DIM))


def test_copies_are_not_claimed_but_hold_the_same_entries() -> None:
    layer = _claimed_layer()
    layer.claim(lambda: True)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert isinstance(other, RaggedLayer)
        for h in range(2):
            assert torch.equal(other.head(h).keys, layer.head(h).keys)
        with pytest.raises(UnsupportedCacheError):
            other.update(torch.randn(2, 2, 1, DIM), torch.randn(2, 2, 1, DIM))


def test_no_rectangular_tensors() -> None:
    layer = _claimed_layer()
    for name in ("keys", "values"):
        with pytest.raises(UnsupportedCacheError, match=r"layer\.head\(h\)"):
            getattr(layer, name)


def test_crop_and_reset() -> None:
    layer = _claimed_layer()
    with pytest.raises(ValueError, match="positive"):
        layer.crop(2)
    with pytest.raises(ValueError, match="shortest head"):
        layer.crop(-4)
    layer.crop(-1)
    assert layer.head_lengths == [2, 3]
    layer.reset()
    assert type(layer) is DynamicLayer and not layer.is_initialized and layer.get_seq_length() == 0
    layer.update(torch.ones(1, 2, 3, DIM), torch.ones(1, 2, 3, DIM))  # an ordinary empty layer again
    assert layer.keys is not None and layer.keys.shape == (1, 2, 3, DIM)


def test_only_dynamic_and_growing_layers_become_ragged() -> None:
    keys = torch.randn(1, 2, 4, DIM)
    plan = ragged_plan([[torch.arange(3), torch.arange(1)]])
    sliding = DynamicSlidingWindowLayer(sliding_window=8)
    sliding.update(keys, keys)
    for layer in (sliding, _claimed_layer()):
        with pytest.raises(UnsupportedCacheError, match="DynamicLayer or GrowingLayer"):
            apply_ragged_plan(layer, plan)


def test_uniform_head_counts_make_a_rectangular_plan() -> None:
    plan = ragged_plan([[torch.tensor([1, 3]), torch.tensor([0, 2])], [torch.tensor([4]), torch.tensor([2])]])
    assert plan.head_valid is None and not plan.is_ragged
    assert plan.slot_valid.tolist() == [[True, True], [False, True]]
    layer = _layer(torch.randn(2, 2, 5, DIM), torch.randn(2, 2, 5, DIM), growing=False)
    apply_plan(layer, plan)
    assert type(layer) is DynamicLayer and layer.keys is not None and layer.keys.shape == (2, 2, 2, DIM)
