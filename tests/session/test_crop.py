"""``cache.crop`` on a compressed cache: it continues like the cache that never saw the removed tokens.

Assisted decoding removes rejected drafts with ``cache.crop(-r)``. The session's state (each
layer's slots, the columns the cache has seen, each row's next position) must follow, so that
the cache continues exactly like a cache that was never given the removed tokens. The reference
is independent of crop: a fresh compressed prefill of the same prompt, then only the surviving
tokens in one call.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicCache

from kvpress_mm import Compressor
from kvpress_mm.errors import InvalidInputError
from kvpress_mm.session.state import state_of
from tests.helpers.tiny_models import build, left_padded

ATOL = 1e-5


@functools.cache
def _model() -> torch.nn.Module:
    return build("llama", seed=3)


def _prefill(ids: torch.Tensor, mask: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=_model().config)
    with torch.no_grad():
        _model()(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), cache=cache, use_cache=True)
    return cache


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _feed(cache: DynamicCache, tokens: torch.Tensor, mask: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
    """Run ``tokens`` ``[B, q]`` on ``cache`` after the conversation ``mask``; the logits ``[B, q, vocab]``."""
    full = torch.cat([mask, new_mask], dim=1)
    positions = _positions(full)[:, -tokens.shape[1] :]
    with torch.no_grad():
        out = _model()(input_ids=tokens, attention_mask=full, position_ids=positions, cache=cache, use_cache=True)
    return out.logits


def _ones(n: int) -> torch.Tensor:
    return torch.ones(2, n, dtype=torch.long)


def _grown(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The conversation's mask after ``n`` more real tokens in each row."""
    return torch.cat([mask, _ones(n)], dim=1)


def _lengths(cache: DynamicCache) -> list[int]:
    return [layer.get_seq_length() for layer in cache.layers]


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("feed"), st.integers(1, 3)),
        st.tuples(st.just("crop"), st.integers(0, 3)),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS, growing=st.booleans(), name=st.sampled_from(["snapkv", "streaming", "lookm-pivotal"]))
def test_a_cropped_cache_continues_like_one_that_never_saw_the_tokens(
    operations: list[tuple[str, int]], growing: bool, name: str
) -> None:
    ids, mask, _ = left_padded([14, 20], seed=2)
    tokens = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(7))
    compressor = Compressor.from_name(name, compression_ratio=0.5)
    with compressor(_model(), growing_cache=growing):
        cache = _prefill(ids, mask)
        prompt_lengths = _lengths(cache)
        kept = 0  # tokens fed and not cropped: tokens[:, :kept]
        for operation, n in operations:
            if operation == "feed":
                n = min(n, tokens.shape[1] - kept)
                if n:
                    _feed(cache, tokens[:, kept : kept + n], _grown(mask, kept), _ones(n))
                    kept += n
            else:
                n = min(n, kept)
                cache.crop(-n)
                kept -= n
        state = state_of(cache)
        assert state is not None
        assert state.seen_columns == ids.shape[1] + kept
        assert state.next_positions is not None
        assert state.next_positions.tolist() == (mask.sum(-1) + kept).tolist()
        assert _lengths(cache) == [n + kept for n in prompt_lengths]
        assert all(layer.length == n + kept for layer, n in zip(state.layers.values(), prompt_lengths))
        probe = tokens[:, kept : kept + 1]
        got = _feed(cache, probe, _grown(mask, kept), _ones(1))

        reference_cache = _prefill(ids, mask)
        if kept:
            _feed(reference_cache, tokens[:, :kept], mask, _ones(kept))
        want = _feed(reference_cache, probe, _grown(mask, kept), _ones(1))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_a_crop_follows_each_rows_real_tokens() -> None:
    """A step whose token is padding in one row: cropping it moves only the other row's next position back."""
    ids, mask, _ = left_padded([14, 20], seed=2)
    with Compressor.from_name("snapkv", compression_ratio=0.5)(_model()):
        cache = _prefill(ids, mask)
        state = state_of(cache)
        assert state is not None and state.next_positions is not None
        before = state.next_positions.clone()
        step = torch.tensor([[0], [1]])  # row 0's new column is padding
        _feed(cache, torch.tensor([[0], [9]]), mask, step)
        assert (state.next_positions - before).tolist() == [0, 1]
        cache.crop(-1)
        assert state.next_positions.tolist() == before.tolist()
        assert state.seen_columns == ids.shape[1]
        for layer in state.layers.values():
            assert layer.slot_valid is None or layer.slot_valid.shape[1] == layer.length


def test_crops_that_cannot_be_followed_are_refused_before_the_cache_changes() -> None:
    ids, mask, _ = left_padded([14, 20], seed=2)
    with Compressor.from_name("snapkv", compression_ratio=0.5)(_model()):
        cache = _prefill(ids, mask)
        _feed(cache, torch.tensor([[5, 6], [7, 8]]), mask, _ones(2))
        lengths, state = _lengths(cache), state_of(cache)
        assert state is not None
        seen = state.seen_columns
        with pytest.raises(InvalidInputError, match="reach into the compressed prompt"):
            cache.crop(-3)
        with pytest.raises(InvalidInputError, match="positive argument"):
            cache.crop(5)
        cache.crop(0)
        assert _lengths(cache) == lengths and state.seen_columns == seen
        cache.crop(-2)
        assert _lengths(cache) == [n - 2 for n in lengths] and state.seen_columns == seen - 2


@pytest.mark.parametrize("decode_eviction", [True, False])
def test_a_strategy_that_evicts_while_decoding_cannot_be_cropped(decode_eviction: bool) -> None:
    ids, mask, _ = left_padded([14, 20], seed=2)
    compressor = Compressor.from_name("h2o", compression_ratio=0.5, decode_eviction=decode_eviction)
    assert compressor.evicts_while_decoding is decode_eviction
    with compressor(_model()):
        cache = _prefill(ids, mask)
        _feed(cache, torch.tensor([[5], [7]]), mask, _ones(1))
        lengths = _lengths(cache)
        if decode_eviction:
            with pytest.raises(InvalidInputError, match="decode_eviction=False"):
                cache.crop(-1)
            assert _lengths(cache) == lengths
        else:
            cache.crop(-1)
            assert _lengths(cache) == [n - 1 for n in lengths]


def test_the_strategies_declare_whether_they_evict_while_decoding() -> None:
    from kvpress_mm import list_strategies

    evicting = {name for name in list_strategies() if Compressor.from_name(name).evicts_while_decoding}
    assert "h2o" in evicting  # default decode_eviction=True
    assert {"snapkv", "streaming", "lookm-pivotal", "random", "full"}.isdisjoint(evicting)


def test_a_copy_crops_only_its_own_state() -> None:
    ids, mask, _ = left_padded([14, 20], seed=2)
    with Compressor.from_name("snapkv", compression_ratio=0.5)(_model()):
        cache = _prefill(ids, mask)
        _feed(cache, torch.tensor([[5, 6], [7, 8]]), mask, _ones(2))
        copied = copy.deepcopy(cache)
        copied.crop(-2)
        original, cropped = state_of(cache), state_of(copied)
        assert original is not None and cropped is not None
        assert cropped.seen_columns == original.seen_columns - 2
        assert _lengths(copied) == [n - 2 for n in _lengths(cache)]
