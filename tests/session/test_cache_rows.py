"""Beam search and other changes of a compressed cache's rows; chunked prefill.

Beam search reorders the cache's rows after every step (``cache.reorder_cache(beam_idx)``).
Everything the session keeps per row must follow: ``h2o``'s decode-time scores, a padded
batch's slot masks and budgets, the rows' next positions, the adapter's prompt record.

The references are independent of any reordering:

- each beam that beam search returns is rescored by teacher forcing: a greedy run under the
  same compressor, forced to produce that beam's tokens, on a batch with no reordering at all.
  The log-probabilities it computes must sum to the beam's score;
- a cache whose rows are permuted (or selected, or repeated) continues exactly like the
  unpermuted cache continues, rows permuted alike.
"""

from __future__ import annotations

import copy
import functools
import pickle
from typing import Any

import pytest
import torch
from transformers import LogitsProcessorList

import tests.helpers.tiny_qwen_vlms as qwen
from kvpress_mm import Compressor
from kvpress_mm.errors import InvalidInputError
from kvpress_mm.session.state import state_of
from tests.helpers.beams import ForceTokens, assert_beams_rescored_by_forcing, assert_forced_run_matches
from tests.helpers.masked_reference import cache_of
from tests.helpers.tiny_models import (
    assert_same_model_state,
    build,
    generate,
    hook_count,
    left_padded,
    model_snapshot,
    prompt,
)

ATOL = 1e-4
BEAMS, BEAM_TOKENS = 4, 16
STRATEGIES: list[tuple[str, dict[str, Any]]] = [
    ("h2o", {"window_size": 2}),  # decode eviction: per-beam scores decide every step's eviction
    ("h2o", {}),
    ("snapkv", {"window_size": 4}),
    ("streaming", {}),
]


def _ids(case: tuple[str, dict[str, Any]]) -> str:
    name, config = case
    return name + "".join(f"-{k}={v}" for k, v in config.items())


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _beam_options() -> dict[str, Any]:
    return dict(
        num_beams=BEAMS,
        num_return_sequences=BEAMS,
        max_new_tokens=BEAM_TOKENS,
        length_penalty=0.0,  # sequences_scores = the plain sum of the tokens' log-probabilities
        output_logits=False,
    )


def _assert_beams_switched_parents(out: Any) -> None:
    """Beam search really reordered the cache (otherwise the test proves nothing)."""
    steps = out.beam_indices[:, :BEAM_TOKENS]
    assert bool((steps != steps[:, -1:]).any()), "no beam changed its parent row: nothing was reordered"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("case", STRATEGIES, ids=_ids)
def test_beam_search_scores_equal_teacher_forced_rescoring(
    case: tuple[str, dict[str, Any]], family: str, impl: str
) -> None:
    name, config = case
    model = build(family, impl)
    ids, mask, _ = left_padded([14, 20])
    compressor = Compressor.from_name(name, compression_ratio=0.5, **config)
    with compressor(model) as session:
        out = generate(model, ids, mask, **_beam_options())
    assert session.report.n_keep == (7,) * BEAMS + (10,) * BEAMS  # beams are rows of the compressed batch
    _assert_beams_switched_parents(out)
    assert_beams_rescored_by_forcing(model, compressor, ids, mask, out, BEAMS, BEAM_TOKENS, ATOL)


@functools.cache
def _qwen(kind: str) -> torch.nn.Module:
    return qwen.build(kind, "sdpa", seed=10 + qwen.KINDS.index(kind))


def _qwen_prompts(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    # different images per row: different rope deltas (the adapter's per-row prompt record)
    return [
        qwen.prompt(model, qwen.LAYOUTS["three-images"], seed=1),
        qwen.prompt(model, qwen.LAYOUTS["one-image"], seed=2),
        qwen.prompt(model, qwen.LAYOUTS["no-image"], seed=3),
    ]


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_beam_search_on_qwen_vl_equals_teacher_forced_rescoring(kind: str) -> None:
    model = _qwen(kind)
    prompts = _qwen_prompts(model)[:2]
    compressor = Compressor.from_name("h2o", compression_ratio=0.5, window_size=2)
    with compressor(model):
        out = qwen.generate(model, qwen.batch(prompts), **_beam_options())
    _assert_beams_switched_parents(out)
    width = max(p["input_ids"].shape[1] for p in prompts)
    tokens = out.sequences[:, width:]
    repeated = qwen.batch([p for p in prompts for _ in range(BEAMS)])
    with compressor(model):
        forced = qwen.generate(
            model,
            repeated,
            max_new_tokens=BEAM_TOKENS,
            logits_processor=LogitsProcessorList([ForceTokens(tokens)]),
        )
    assert_forced_run_matches(out, forced, tokens, ATOL)


# -- any change of the rows: reorder, select, repeat ----------------------------------------------

FIRST, SECOND = 3, 4


def _row_change(kind: str) -> tuple[str, Any, torch.Tensor]:
    """``(method, argument, rows kept)`` of a 3-row cache."""
    if kind == "reorder":
        rows = torch.tensor([2, 0, 1])
        return "reorder_cache", rows, rows
    if kind == "reorder-with-repeats":  # what beam search does when one beam spawns two
        rows = torch.tensor([1, 1, 0])
        return "reorder_cache", rows, rows
    if kind == "select":
        rows = torch.tensor([2, 0])
        return "batch_select_indices", rows, rows
    return "batch_repeat_interleave", 2, torch.arange(3).repeat_interleave(2)


def _continue(model: torch.nn.Module, first: Any, mask: torch.Tensor, rows: torch.Tensor | None) -> Any:
    """A second generate on ``first``'s cache (rows ``rows`` of the first turn)."""
    sequences = first.sequences if rows is None else first.sequences[rows]
    mask = mask if rows is None else mask[rows]
    history = torch.cat([mask, torch.ones(mask.shape[0], FIRST, dtype=mask.dtype)], dim=1)
    return generate(model, sequences[:, -1:], history, max_new_tokens=SECOND, cache=cache_of(first))


ROW_CHANGES = ["reorder", "reorder-with-repeats", "select", "repeat"]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("change", ROW_CHANGES)
@pytest.mark.parametrize("case", STRATEGIES[:3], ids=_ids)
def test_changed_rows_continue_like_the_rows_they_came_from(
    case: tuple[str, dict[str, Any]], change: str, impl: str
) -> None:
    """Rows of different prompts (lengths, budgets, filler slots, h2o scores) swapped, dropped, repeated."""
    name, config = case
    model = build("qwen3", impl, seed=3)
    ids, mask, _ = left_padded([14, 24, 19], seed=4)
    compressor = Compressor.from_name(name, compression_ratio=0.5, **config)
    method, argument, rows = _row_change(change)
    with compressor(model):
        first = generate(model, ids, mask, max_new_tokens=FIRST)
        reference = _continue(model, first, mask, None)
        first = generate(model, ids, mask, max_new_tokens=FIRST)
        getattr(cache_of(first), method)(argument)
        second = _continue(model, first, mask, rows)
    assert torch.equal(second.sequences, reference.sequences[rows])
    assert _max_diff(torch.stack(second.logits), torch.stack(reference.logits)[:, rows]) < ATOL


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_changed_rows_follow_the_qwen_prompt_record(kind: str) -> None:
    """The rows' rope deltas (recorded at the prefill) follow them: no error, the same continuation."""
    model = _qwen(kind)
    inputs = qwen.batch(_qwen_prompts(model))
    mask = inputs["attention_mask"]
    rows = torch.tensor([2, 0, 1])
    compressor = Compressor.from_name("h2o", compression_ratio=0.5, window_size=2)

    def second_turn(first: Any, rows: torch.Tensor) -> Any:
        sequences, history = first.sequences[rows], mask[rows]
        history = torch.cat([history, torch.ones(len(rows), FIRST, dtype=history.dtype)], dim=1)
        new = {"input_ids": sequences[:, -1:], "attention_mask": history}
        return qwen.generate(model, new, max_new_tokens=SECOND, cache=cache_of(first))

    with compressor(model):
        first = qwen.generate(model, inputs, max_new_tokens=FIRST)
        deltas = model.model.rope_deltas.clone()
        reference = second_turn(first, torch.arange(3))
        first = qwen.generate(model, inputs, max_new_tokens=FIRST)
        cache_of(first).reorder_cache(rows)
        model.model.rope_deltas = deltas[rows]  # generate's own per-row state, reordered by the caller
        second = second_turn(first, rows)
    assert torch.equal(second.sequences, reference.sequences[rows])
    assert _max_diff(torch.stack(second.logits), torch.stack(reference.logits)[:, rows]) < ATOL


def test_session_state_follows_the_rows() -> None:
    """What the session keeps per row after a reorder: exactly the rows the cache kept."""
    model = build("llama", "sdpa")
    ids, mask, _ = left_padded([10, 16, 13])
    with Compressor.from_name("h2o", compression_ratio=0.5)(model):
        out = generate(model, ids, mask, max_new_tokens=2)
    cache = cache_of(out)
    state = state_of(cache)
    assert state is not None
    layer = state.layers[0]
    before = copy.deepcopy((state.next_positions, layer.slot_valid, layer.n_keep, layer.strategy_state))
    keys = cache.layers[0].keys.clone()
    rows = torch.tensor([1, 2, 2])
    cache.reorder_cache(rows)
    assert torch.equal(cache.layers[0].keys, keys[rows])
    assert torch.equal(state.next_positions, before[0][rows])
    assert layer.slot_valid is not None and torch.equal(layer.slot_valid, before[1][rows])
    assert layer.n_keep == tuple(before[2][i] for i in rows.tolist())
    assert torch.equal(layer.strategy_state["scores"], before[3]["scores"][rows])
    assert layer.strategy_state["windows"] == [before[3]["windows"][i] for i in rows.tolist()]


def test_copies_of_a_compressed_cache_keep_their_own_rows() -> None:
    """A deep copy (or pickle) of a compressed cache reorders itself only, not the original."""
    model = build("llama", "sdpa")
    ids, mask, _ = left_padded([10, 16])
    with Compressor.from_name("h2o", compression_ratio=0.5)(model):
        out = generate(model, ids, mask, max_new_tokens=2)
    cache = cache_of(out)
    state = state_of(cache)
    assert state is not None
    keys, positions = cache.layers[0].keys.clone(), state.next_positions.clone()
    for other in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        other.reorder_cache(torch.tensor([1, 0]))
        assert torch.equal(other.layers[0].keys, keys[[1, 0]])
    assert torch.equal(cache.layers[0].keys, keys)
    assert torch.equal(state.next_positions, positions)
    assert type(cache).__name__ == "DynamicCache"  # the class is untouched: only the instance follows


@pytest.mark.parametrize("name", ["snapkv", "h2o"])
def test_copies_of_a_compressed_cache_continue_as_compressed(name: str) -> None:
    """Branching a conversation: a deep copy / pickle of a compressed cache continues exactly like the original."""
    model = build("llama", "sdpa")
    ids, mask, _ = left_padded([10, 16])
    b = ids.shape[0]
    extra = torch.randint(3, 256, (b, 3), generator=torch.Generator().manual_seed(7))
    with Compressor.from_name(name, compression_ratio=0.5, window_size=2)(model):
        first = generate(model, ids, mask, max_new_tokens=3)
        cache = cache_of(first)
        copies = [copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))]
        new_ids = torch.cat([first.sequences[:, -1:], extra], dim=1)
        history_mask = torch.cat([mask, torch.ones(b, 3 + 3, dtype=mask.dtype)], dim=1)
        branches = [generate(model, new_ids, history_mask, max_new_tokens=4, cache=c) for c in copies]
        original = generate(model, new_ids, history_mask, max_new_tokens=4, cache=cache)
    for branch in branches:
        assert torch.equal(branch.sequences, original.sequences)
        assert _max_diff(torch.stack(branch.logits), torch.stack(original.logits)) == 0.0
    # the copies are independent: each grew on its own
    assert all(c.layers[0].keys.shape == cache.layers[0].keys.shape for c in copies)
    assert all(c.layers[0].keys.data_ptr() != cache.layers[0].keys.data_ptr() for c in copies)


# -- chunked prefill ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_chunked_prefill_raises_and_leaves_the_model_as_found(impl: str) -> None:
    model = build("llama", impl)
    before = model_snapshot(model)
    reference = generate(model, prompt(20), max_new_tokens=3)
    with Compressor.from_name("snapkv", compression_ratio=0.5, window_size=4)(model):
        with pytest.raises(InvalidInputError, match="chunked prefill is not supported under compression") as info:
            generate(model, prompt(20), max_new_tokens=3, prefill_chunk_size=8)
        assert "prefill_chunk_size" in str(info.value)
        assert "_prefill" in vars(model)  # the guard is installed (so the check after the block is not vacuous)
        # the whole prompt in one call still works inside the same session
        out = generate(model, prompt(20), max_new_tokens=3)
        assert cache_of(out).layers[0].keys.shape[-2] == 10 + 2
    assert "_prefill" not in vars(model)
    assert hook_count(model) == 0
    assert_same_model_state(before, model_snapshot(model))
    after = generate(model, prompt(20), max_new_tokens=3, prefill_chunk_size=8)  # chunked, uncompressed: fine
    assert torch.equal(after.sequences, reference.sequences)


def test_chunked_prefill_continuing_a_compressed_cache_raises() -> None:
    model = build("qwen2", "sdpa")
    ids = prompt(20)
    with Compressor.from_name("h2o", compression_ratio=0.5)(model):
        first = generate(model, ids, max_new_tokens=3)
        new = torch.cat([first.sequences[:, -1:], prompt(10, seed=1)[:, 1:]], dim=1)
        history = torch.ones(1, 20 + 3 + 9, dtype=torch.long)
        with pytest.raises(InvalidInputError, match="chunked prefill"):
            generate(model, new, history, max_new_tokens=2, cache=cache_of(first), prefill_chunk_size=4)


def test_chunked_prefill_without_compression_is_plain_transformers() -> None:
    """A no-op compressor changes nothing, chunked prefill included."""
    model = build("mistral", "sdpa")
    reference = generate(model, prompt(20), max_new_tokens=3, prefill_chunk_size=8)
    with Compressor.from_name("snapkv", compression_ratio=0.0)(model):
        assert "_prefill" not in vars(model)
        out = generate(model, prompt(20), max_new_tokens=3, prefill_chunk_size=8)
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits, strict=True):
        assert torch.equal(got, want)
