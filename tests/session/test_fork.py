"""One compressed context, many questions: ``fork_cache`` of the context's cache for each question.

The reference is a fresh compression of the context for every question: the answers on forks
must be exactly its answers (tokens and logits), the context's cache must stay as it was, and
forks must not copy the context's entries until they decode.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from transformers.cache_utils import DynamicCache

import tests.helpers.tiny_qwen_vlms as qwen
from kvpress_mm import Compressor, fork_cache
from kvpress_mm.cache.growing import GrowingLayer
from kvpress_mm.session.state import state_of
from tests.helpers import tiny_models
from tests.helpers.tiny_vlms import build_vlm, make_prompt

ANSWER = 5
QUESTIONS = [5, 8, 3]  # question lengths
STRATEGIES: list[tuple[str, dict[str, Any]]] = [
    ("snapkv", {"window_size": 4}),
    ("h2o", {}),  # decode eviction: per-entry scores in the strategy state, copied per fork
    ("lookm-pivotal", {}),
]


@functools.cache
def _model(kind: str) -> torch.nn.Module:
    if kind == "llava":
        return build_vlm("llava", seed=0)
    if kind == "qwen2_vl":
        return qwen.build("qwen2_vl", seed=0)
    return tiny_models.build("llama", seed=0)


def _context(kind: str) -> dict[str, torch.Tensor]:
    model = _model(kind)
    if kind == "llava":
        return make_prompt("llava", model, 2, seed=0).inputs()
    if kind == "qwen2_vl":
        return qwen.prompt(model, qwen.LAYOUTS["three-images"], seed=1)
    ids = tiny_models.prompt(30)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _questions() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, 240, (1, n), generator=generator) for n in QUESTIONS]


def _compress_context(model: torch.nn.Module, context: dict[str, torch.Tensor]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**context, cache=cache, use_cache=True)
    return cache


def _ask(model: torch.nn.Module, cache: Any, context_length: int, question: torch.Tensor) -> Any:
    mask = torch.ones(1, context_length + question.shape[1], dtype=torch.long)
    with torch.no_grad():
        return model.generate(  # type: ignore[operator]
            input_ids=question,
            attention_mask=mask,
            cache=cache,
            max_new_tokens=ANSWER,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            suppress_tokens=[qwen.IMAGE, qwen.VIDEO, qwen.VSTART, qwen.VEND],
        )


def _snapshot(cache: DynamicCache) -> list[torch.Tensor]:
    return [t.clone() for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("case", STRATEGIES, ids=[name for name, _ in STRATEGIES])
@pytest.mark.parametrize(
    ("kind", "growing"),
    [("llava", True), ("llava", False), ("qwen2_vl", True), ("llama", True)],
    ids=["llava-growing-layers", "llava-dynamic-layers", "qwen2_vl", "llama"],
)
def test_answers_on_forks_equal_a_fresh_compression_per_question(
    kind: str, case: tuple[str, dict[str, Any]], growing: bool
) -> None:
    model, context = _model(kind), _context(kind)
    length = int(context["input_ids"].shape[1])
    compressor = Compressor.from_name(case[0], compression_ratio=0.5, **case[1])
    with compressor(model, growing_cache=growing) as session:
        base = _compress_context(model, context)
        assert session.report.kv_bytes_after < session.report.kv_bytes_before
        before = _snapshot(base)
        seen = state_of(base).seen_columns  # type: ignore[union-attr]
        forked = [_ask(model, fork_cache(base), length, q) for q in _questions()]
        again = _ask(model, fork_cache(base), length, _questions()[0])  # the base still works, same answer
        assert all(torch.equal(a, b) for a, b in zip(_snapshot(base), before, strict=True))
        assert state_of(base).seen_columns == seen  # type: ignore[union-attr]
    fresh = []
    for question in _questions():
        with compressor(model, growing_cache=growing):
            fresh.append(_ask(model, _compress_context(model, context), length, question))
    for got, want in zip([*forked, again], [*fresh, fresh[0]], strict=True):
        assert torch.equal(got.sequences, want.sequences)
        assert torch.equal(torch.stack(got.logits), torch.stack(want.logits))


@pytest.mark.parametrize("growing", [True, False], ids=["growing-layers", "dynamic-layers"])
def test_forks_share_the_context_until_they_decode(growing: bool) -> None:
    model, context = _model("llava"), _context("llava")
    length = int(context["input_ids"].shape[1])
    with Compressor.from_name("h2o", compression_ratio=0.5)(model, growing_cache=growing):
        base = _compress_context(model, context)
        forks = [fork_cache(base) for _ in range(3)]
        for fork in forks:
            assert type(fork) is type(base) and fork is not base
            for mine, theirs in zip(fork.layers, base.layers, strict=True):
                assert type(mine) is type(theirs) and mine is not theirs
                assert mine.keys.data_ptr() == theirs.keys.data_ptr()  # the same memory: nothing copied
                assert mine.values.data_ptr() == theirs.values.data_ptr()
        # the session's state is each fork's own (h2o's per-entry scores included)
        states = [state_of(c) for c in (base, *forks)]
        assert all(s is not None for s in states) and len({id(s) for s in states}) == 4
        scores = [s.layers[0].strategy_state["scores"] for s in states]  # type: ignore[union-attr]
        assert len({id(t) for t in scores}) == 4 and all(torch.equal(t, scores[0]) for t in scores)
        before = _snapshot(base)
        _ask(model, forks[0], length, _questions()[0])
        assert all(torch.equal(a, b) for a, b in zip(_snapshot(base), before, strict=True))
        for mine, theirs in zip(forks[1].layers, base.layers, strict=True):  # a waiting fork still shares
            assert mine.keys.data_ptr() == theirs.keys.data_ptr()
        if growing:
            assert all(isinstance(layer, GrowingLayer) and layer.shares_buffers for layer in base.layers)
            assert not any(layer.shares_buffers for layer in forks[0].layers)  # decoded: its own buffers


def test_a_fork_of_an_uncompressed_cache_continues_like_it() -> None:
    model, context = _model("llama"), _context("llama")
    length = int(context["input_ids"].shape[1])
    base = _compress_context(model, context)  # no compressor: a plain cache
    question = _questions()[1]
    got = _ask(model, fork_cache(base), length, question)
    want = _ask(model, base, length, question)
    assert torch.equal(got.sequences, want.sequences)


def test_fork_needs_a_cache() -> None:
    with pytest.raises(TypeError, match="DynamicCache"):
        fork_cache({"keys": torch.zeros(1)})
