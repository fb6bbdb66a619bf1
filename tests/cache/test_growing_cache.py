"""GrowingLayer: the same keys and values as transformers' DynamicLayer, appended in place.

Property tests drive a DynamicLayer and a GrowingLayer through the same random sequence of
operations (updates of any length, crop, beam reorder, batch selection and repetition,
cache-surgery assignment, reset) and compare everything transformers reads from a layer; two
growing layers sharing their buffers (``fork_cache``) behave like two independent layers.
End to end: generate's logits are the same with a cache of growing layers, and under
compression with and without the session's growing layers.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from kvpress_mm import Compressor
from kvpress_mm.cache.fork import fork_cache
from kvpress_mm.cache.growing import GrowingLayer, growing_dynamic_cache
from kvpress_mm.cache.surgery import apply_plan, kv_bytes
from kvpress_mm.ops.budget import n_keep_for
from kvpress_mm.ops.plan import CompressionPlan
from tests.helpers.tiny_models import build, generate, prompt

HEADS, DIM = 2, 4


def _states(generator: torch.Generator, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.randn(batch, HEADS, length, DIM, generator=generator)
    values = torch.randn(batch, HEADS, length, DIM, generator=generator)
    return keys, values


def _assert_same(reference: DynamicLayer, layer: GrowingLayer) -> None:
    assert layer.is_initialized == reference.is_initialized
    assert layer.get_seq_length() == reference.get_seq_length()
    for q in (1, 3):
        assert layer.get_mask_sizes(q) == reference.get_mask_sizes(q)
    if reference.get_seq_length() > 0:
        assert reference.keys is not None and reference.values is not None
        assert layer.keys is not None and layer.values is not None
        assert torch.equal(layer.keys, reference.keys)
        assert torch.equal(layer.values, reference.values)
        assert layer.keys.dtype == reference.keys.dtype
        assert kv_bytes(layer) == kv_bytes(reference)
        assert layer.capacity >= layer.get_seq_length()
    elif reference.keys is None:
        assert layer.keys is None and layer.values is None


# One operation: (name, integer parameters drawn by hypothesis; interpreted against the current state).
OPERATIONS = st.one_of(
    st.tuples(st.just("update"), st.integers(1, 9)),
    st.tuples(st.just("update"), st.just(1)),  # decode steps are the common case
    st.tuples(st.just("crop"), st.integers(0, 6)),
    st.tuples(st.just("reorder"), st.integers(0, 10**6)),
    st.tuples(st.just("select"), st.integers(0, 10**6)),
    st.tuples(st.just("repeat"), st.integers(1, 3)),
    st.tuples(st.just("surgery"), st.integers(0, 10**6)),
    st.tuples(st.just("reset"), st.just(0)),
)


def _apply(layer: DynamicLayer, operation: tuple[str, int], batch: int, generator_seed: int) -> int:
    """Apply one operation to ``layer``; returns the batch size afterwards. Deterministic in its inputs."""
    name, parameter = operation
    generator = torch.Generator().manual_seed(generator_seed)
    length = layer.get_seq_length()
    if name == "update":
        keys, values = _states(generator, batch, parameter)
        out_keys, out_values = layer.update(keys, values)
        assert out_keys.shape[-2] == length + parameter
        assert torch.equal(out_keys[:, :, length:], keys) and torch.equal(out_values[:, :, length:], values)
    elif name == "crop":
        layer.crop(-min(parameter, length))
    elif name == "reorder" and length:
        layer.reorder_cache(torch.randperm(batch, generator=generator))
    elif name == "select" and length:
        rows = torch.randint(0, batch, (1 + parameter % 3,), generator=generator)
        layer.batch_select_indices(rows)
        return int(rows.numel())
    elif name == "repeat" and length:
        layer.batch_repeat_interleave(parameter)
        return batch * parameter
    elif name == "surgery" and length:
        # what cache_surgery.apply_plan does: keep a per-head subset of the entries
        keep = 1 + parameter % length
        scores = torch.rand(batch, HEADS, length, generator=generator)
        kept = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
        apply_plan(layer, CompressionPlan(kept, torch.ones(batch, keep, dtype=torch.bool)))
    elif name == "reset":
        layer.reset()
    return batch


@settings(max_examples=150, deadline=None)
@given(
    operations=st.lists(OPERATIONS, min_size=1, max_size=25),
    batch=st.integers(1, 3),
    headroom=st.integers(0, 5),
    growth=st.sampled_from([1.25, 1.5, 2.0, 3.0]),
    seed=st.integers(0, 1000),
)
def test_same_keys_and_values_as_dynamic_layer(
    operations: list[tuple[str, int]], batch: int, headroom: int, growth: float, seed: int
) -> None:
    reference = DynamicLayer()
    layer = GrowingLayer(headroom=headroom, growth=growth)
    _assert_same(reference, layer)
    batch_now = batch
    for step, operation in enumerate(operations):
        if operation[0] == "reset":
            batch_now = batch
        after = _apply(reference, operation, batch_now, seed + step)
        assert _apply(layer, operation, batch_now, seed + step) == after
        batch_now = after
        _assert_same(reference, layer)


@settings(max_examples=100, deadline=None)
@given(
    before=st.lists(OPERATIONS, min_size=1, max_size=8),
    after=st.lists(st.tuples(st.booleans(), OPERATIONS), min_size=1, max_size=16),
    batch=st.integers(1, 3),
    headroom=st.integers(0, 5),
    seed=st.integers(0, 1000),
)
def test_shared_buffers_behave_like_two_independent_layers(
    before: list[tuple[str, int]], after: list[tuple[bool, tuple[str, int]]], batch: int, headroom: int, seed: int
) -> None:
    """fork_cache's layers share the buffers (copy-on-write): each still behaves like its own DynamicLayer."""
    reference, layer = DynamicLayer(), GrowingLayer(headroom=headroom)
    batch_now = batch
    for step, operation in enumerate(before):
        if operation[0] == "reset":
            batch_now = batch
        after_step = _apply(reference, operation, batch_now, seed + step)
        assert _apply(layer, operation, batch_now, seed + step) == after_step
        batch_now = after_step
    cache = DynamicCache()
    cache.layers = [layer]
    fork = fork_cache(cache)
    twin = fork.layers[0]
    assert isinstance(twin, GrowingLayer) and twin is not layer
    assert twin.buffers[0] is layer.buffers[0]  # shared, not copied
    pairs = {False: (reference, layer), True: (copy.deepcopy(reference), twin)}
    batches = {False: batch_now, True: batch_now}
    for step, (on_twin, operation) in enumerate(after):
        want, got = pairs[on_twin]
        if operation[0] == "reset":
            batches[on_twin] = batch
        batch_before = batches[on_twin]
        batches[on_twin] = _apply(want, operation, batch_before, seed + 100 + step)
        assert _apply(got, operation, batch_before, seed + 100 + step) == batches[on_twin]
        for check_want, check_got in pairs.values():
            _assert_same(check_want, check_got)


def test_a_shared_buffer_is_copied_on_first_write() -> None:
    layer = GrowingLayer.from_tensors(torch.randn(1, HEADS, 6, DIM), torch.randn(1, HEADS, 6, DIM), headroom=3)
    cache = DynamicCache()
    cache.layers = [layer]
    twin = fork_cache(cache).layers[0]
    assert isinstance(twin, GrowingLayer)
    assert layer.shares_buffers and twin.shares_buffers and twin.buffers[0] is layer.buffers[0]
    keys = layer.keys.clone()  # type: ignore[union-attr]
    twin.update(torch.ones(1, HEADS, 1, DIM), torch.ones(1, HEADS, 1, DIM))  # room in the buffer: still copies
    assert not twin.shares_buffers and twin.buffers[0] is not layer.buffers[0]
    assert layer.shares_buffers  # the other holder still must not write in place
    layer.update(torch.zeros(1, HEADS, 1, DIM), torch.zeros(1, HEADS, 1, DIM))
    assert not layer.shares_buffers
    assert torch.equal(layer.keys[:, :, :6], keys) and torch.equal(twin.keys[:, :, :6], keys)  # type: ignore[index]
    assert float(layer.keys[0, 0, 6, 0]) == 0.0 and float(twin.keys[0, 0, 6, 0]) == 1.0  # type: ignore[index]


def test_deepcopy_copies_the_filled_part_only() -> None:
    layer = GrowingLayer.from_tensors(torch.randn(1, HEADS, 6, DIM), torch.randn(1, HEADS, 6, DIM), headroom=100)
    twin = copy.deepcopy(layer)
    assert layer.capacity == 106 and twin.capacity == 6
    assert twin.allocated_bytes() == kv_bytes(twin) == kv_bytes(layer)
    assert torch.equal(twin.keys, layer.keys) and twin.buffers[0] is not layer.buffers[0]  # type: ignore[arg-type]
    twin.update(torch.ones(1, HEADS, 1, DIM), torch.ones(1, HEADS, 1, DIM))
    assert layer.get_seq_length() == 6 and twin.get_seq_length() == 7


@settings(max_examples=50, deadline=None)
@given(steps=st.lists(st.integers(1, 4), min_size=1, max_size=60), headroom=st.integers(0, 4))
def test_appends_are_amortized(steps: list[int], headroom: int) -> None:
    """Geometric growth: reallocations grow like log(total), and appends within capacity copy nothing."""
    layer = GrowingLayer(headroom=headroom, growth=2.0)
    generator = torch.Generator().manual_seed(0)
    total = 0
    for n in steps:
        capacity, buffer = layer.capacity, layer._key_buffer
        layer.update(*_states(generator, 1, n))
        total += n
        if total <= capacity:  # fitted: the very same buffer, written in place
            assert layer._key_buffer is buffer
    # first allocation, then at least doubling each time: 1 + log2(total) reallocations at most
    assert layer.reallocations <= 2 + total.bit_length()


def test_update_returns_views_of_one_buffer() -> None:
    layer = GrowingLayer(headroom=8)
    keys, values = layer.update(torch.randn(1, HEADS, 5, DIM), torch.randn(1, HEADS, 5, DIM))
    assert layer.capacity == 13 and layer.reallocations == 1
    pointer = keys.data_ptr()
    for _ in range(8):
        keys, values = layer.update(torch.randn(1, HEADS, 1, DIM), torch.randn(1, HEADS, 1, DIM))
        assert keys.data_ptr() == pointer and keys.shape[-2] == layer.get_seq_length()
    assert layer.reallocations == 1 and layer.get_seq_length() == 13
    layer.update(torch.randn(1, HEADS, 1, DIM), torch.randn(1, HEADS, 1, DIM))
    assert layer.reallocations == 2 and layer.capacity == 26  # doubled


def test_shrinking_releases_memory() -> None:
    """Cache surgery on a large growing layer really frees the evicted entries' memory."""
    layer = GrowingLayer(headroom=4)
    layer.update(torch.randn(1, HEADS, 1000, DIM), torch.randn(1, HEADS, 1000, DIM))
    before = layer.allocated_bytes()
    kept = torch.arange(0, 1000, 10).expand(1, HEADS, -1)
    apply_plan(layer, CompressionPlan(kept, torch.ones(1, 100, dtype=torch.bool)))
    assert layer.get_seq_length() == 100
    assert layer.allocated_bytes() == 2 * HEADS * (100 + 4) * DIM * 4 < before / 9
    layer.crop(-90)  # a big crop reallocates too
    assert layer.capacity == 10 + 4


def test_small_assignment_reuses_the_buffer() -> None:
    """h2o's decode-time eviction (one entry fewer each step) writes into the same buffer."""
    layer = GrowingLayer.from_tensors(torch.randn(1, HEADS, 50, DIM), torch.randn(1, HEADS, 50, DIM), headroom=8)
    buffer = layer._key_buffer
    for _ in range(5):
        layer.update(torch.randn(1, HEADS, 1, DIM), torch.randn(1, HEADS, 1, DIM))
        kept = torch.arange(1, 51).expand(1, HEADS, -1)
        expected = layer.keys[:, :, 1:].clone()  # type: ignore[index]
        apply_plan(layer, CompressionPlan(kept, torch.ones(1, 50, dtype=torch.bool)))
        assert layer._key_buffer is buffer and torch.equal(layer.keys, expected)  # type: ignore[arg-type]


def test_from_tensors_and_deepcopy() -> None:
    keys, values = torch.randn(2, HEADS, 6, DIM), torch.randn(2, HEADS, 6, DIM)
    layer = GrowingLayer.from_tensors(keys, values, headroom=3)
    assert layer.capacity == 9 and torch.equal(layer.keys, keys) and torch.equal(layer.values, values)  # type: ignore[arg-type]
    twin = copy.deepcopy(layer)
    twin.update(torch.zeros(2, HEADS, 1, DIM), torch.zeros(2, HEADS, 1, DIM))
    assert layer.get_seq_length() == 6 and twin.get_seq_length() == 7
    assert torch.equal(layer.keys, keys)  # type: ignore[arg-type]


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="headroom"):
        GrowingLayer(headroom=-1)
    with pytest.raises(ValueError, match="growth"):
        GrowingLayer(growth=1.0)
    layer = GrowingLayer()
    layer.update(torch.randn(1, HEADS, 2, DIM), torch.randn(1, HEADS, 2, DIM))
    with pytest.raises(ValueError, match="cannot append"):
        layer.update(torch.randn(2, HEADS, 1, DIM), torch.randn(2, HEADS, 1, DIM))


def test_growing_dynamic_cache_layers() -> None:
    model = build("llama")
    cache = growing_dynamic_cache(model.config)
    assert [type(layer) for layer in cache.layers] == [GrowingLayer, GrowingLayer]
    lazy = growing_dynamic_cache()
    lazy.update(torch.randn(1, HEADS, 3, DIM), torch.randn(1, HEADS, 3, DIM), 1)
    assert [type(layer) for layer in lazy.layers] == [GrowingLayer, GrowingLayer]
    # sliding-window layers keep transformers' class
    mistral = build("mistral", sliding_window=8)
    sliding = growing_dynamic_cache(mistral.config)
    assert all(type(layer) is DynamicSlidingWindowLayer for layer in sliding.layers)


def _logits(output: Any) -> torch.Tensor:
    return torch.stack(list(output.logits))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generate_is_identical_with_growing_layers(impl: str) -> None:
    model = build("llama", impl)
    ids = prompt(40)
    stock = generate(model, ids, max_new_tokens=8, cache=DynamicCache(config=model.config))
    cache = growing_dynamic_cache(model.config, headroom=3)  # reallocates while decoding
    grown = generate(model, ids, max_new_tokens=8, cache=cache)
    assert torch.equal(_logits(stock), _logits(grown))
    assert torch.equal(stock.sequences, grown.sequences)
    assert all(type(layer) is GrowingLayer and layer.reallocations == 2 for layer in cache.layers)


# -- under compression -----------------------------------------------------------------------

STRATEGIES = ["snapkv", "lookm-pivotal", "h2o", "streaming"]  # h2o evicts at every decode step


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_compressed_generate_is_identical_with_and_without_growing_layers(name: str, impl: str) -> None:
    model = build("llama", impl)
    ids = prompt(300)
    compressor = Compressor.from_name(name, compression_ratio=0.8)
    outputs, caches = {}, {}
    for growing in (False, True):
        with compressor(model, growing_cache=growing) as session:
            out = generate(model, ids, max_new_tokens=140)  # beyond the headroom: the layers grow
        outputs[growing], caches[growing] = out, out.cache
        assert session.report.layers_compressed == 2
    assert torch.equal(_logits(outputs[False]), _logits(outputs[True]))
    assert torch.equal(outputs[False].sequences, outputs[True].sequences)
    assert all(type(layer) is DynamicLayer for layer in caches[False].layers)
    assert all(type(layer) is GrowingLayer for layer in caches[True].layers)
    for stock, grown in zip(caches[False].layers, caches[True].layers):
        assert torch.equal(stock.keys, grown.keys) and torch.equal(stock.values, grown.values)
    if name != "h2o":  # exactly n_keep, then + 1 + 128 headroom at the first append, then the decoded part doubled
        n_keep = n_keep_for(300, 0.8)
        capacity = n_keep + 2 * (1 + 128)
        assert all(layer.reallocations == 3 and layer.capacity == capacity for layer in caches[True].layers)


def test_report_counts_the_kept_entries_not_the_headroom() -> None:
    model = build("llama")
    ids = prompt(100)
    with Compressor.from_name("snapkv", compression_ratio=0.5, window_size=8)(model) as session:
        out = generate(model, ids, max_new_tokens=3)  # two decode steps: the first adds the headroom
    layer = out.cache.layers[0]
    entry_bytes = 2 * 2 * 16 * 4  # keys and values, 2 KV heads, head_dim 16, float32
    assert session.report.kv_bytes_after == 2 * 50 * entry_bytes
    assert layer.allocated_bytes() == (50 + 1 + 128) * entry_bytes


def test_a_growing_cache_passed_in_is_compressed() -> None:
    model = build("llama")
    ids = prompt(500)
    compressor = Compressor.from_name("lookm-evict", compression_ratio=0.8)
    with compressor(model, growing_cache=False):
        stock = generate(model, ids, max_new_tokens=5)
    cache = growing_dynamic_cache(model.config)
    with compressor(model):
        grown = generate(model, ids, max_new_tokens=5, cache=cache)
    assert torch.equal(_logits(stock), _logits(grown))
    layer = cache.layers[0]
    n_keep = n_keep_for(500, 0.8)  # 99: 1 - 0.8 is 0.19999999999999996
    assert isinstance(layer, GrowingLayer) and layer.get_seq_length() == n_keep + 4
    # the prompt's buffer (500 + 128 entries, more than twice what is needed) was released
    assert layer.capacity == n_keep + 128


def test_adopt_converts_a_dynamic_layer_in_place() -> None:
    layer = DynamicLayer()
    keys, values = torch.randn(1, HEADS, 7, DIM), torch.randn(1, HEADS, 7, DIM)
    layer.update(keys, values)
    same = GrowingLayer.adopt(layer, headroom=2)
    assert same is layer and type(layer) is GrowingLayer
    assert "keys" not in vars(layer) and "values" not in vars(layer)  # no stale copy kept alive
    assert torch.equal(layer.keys, keys) and layer.capacity == 9  # type: ignore[arg-type]
    layer.update(torch.zeros(1, HEADS, 1, DIM), torch.zeros(1, HEADS, 1, DIM))
    assert layer.get_seq_length() == 8 and layer.reallocations == 1
    empty = GrowingLayer.adopt(DynamicLayer())
    assert empty.keys is None and empty.get_seq_length() == 0
    with pytest.raises(TypeError, match="DynamicLayer"):
        GrowingLayer.adopt(DynamicSlidingWindowLayer(sliding_window=4))


def test_pickle_round_trip() -> None:
    import pickle

    layer = GrowingLayer.from_tensors(torch.randn(1, HEADS, 5, DIM), torch.randn(1, HEADS, 5, DIM), headroom=3)
    copy_ = pickle.loads(pickle.dumps(layer))
    assert type(copy_) is GrowingLayer and copy_.capacity == 8
    assert torch.equal(copy_.keys, layer.keys) and torch.equal(copy_.values, layer.values)  # type: ignore[arg-type]


def test_adopted_exact_layer_has_no_headroom_until_the_first_append() -> None:
    """``adopt(exact=True)``: storage is exactly the entries; growth never doubles the adopted base."""
    from transformers.cache_utils import DynamicLayer

    keys, values = torch.randn(2, HEADS, 40, DIM), torch.randn(2, HEADS, 40, DIM)
    layer = DynamicLayer()
    layer.update(keys, values)
    GrowingLayer.adopt(layer, headroom=8, growth=2.0, exact=True)
    assert layer.capacity == 40
    assert layer.keys is not None and layer.keys.untyped_storage().nbytes() == 2 * HEADS * 40 * DIM * 4
    for step in range(1, 30):
        layer.update(torch.full((2, HEADS, 1, DIM), float(step)), torch.full((2, HEADS, 1, DIM), -float(step)))
        appended = step
        # geometric in the appended entries only: at most the base + growth x (appended + headroom)
        assert 40 + appended <= layer.capacity <= 40 + 2 * (appended + 8)
    assert torch.equal(layer.keys[:, :, :40], keys)
    assert torch.equal(layer.keys[:, :, 40:, 0], torch.arange(1, 30.0).expand(2, HEADS, -1))
