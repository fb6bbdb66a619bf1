"""Wrappers end to end on tiny models: a text LM, LLaVA and Qwen2-VL, sdpa and eager, left-padded batches.

Each run checks the budgets every layer keeps for every row (from the wrappers' definitions),
that each row of a batch generates what it generates alone, and, for eviction-only inner
strategies, that decoding equals the masked no-cache reference (per layer and KV head) - with
per-layer cache lengths, so the session's own decode masks are checked on eager too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from kvpress_mm import Compressor, Modality
from kvpress_mm.ops.budget import n_keep_for
from tests.helpers import tiny_models, tiny_qwen_vlms, tiny_vlms
from tests.helpers.masked_reference import (
    PlanRecorder,
    cache_of,
    compressed_visibility,
    decode_step_logits,
    masked_logits,
    plain_visibility,
)
from tests.helpers.references import naive_pyramid

ATOL = 1e-4
TEETH = 1e-3
NEW_TOKENS = 3
RATIO = 0.6
FAMILIES = ("llama", "llava", "qwen2_vl")


@dataclass
class Batch:
    """A left-padded batch of two prompts of one family, and how to run and check it."""

    family: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    singles: list[dict[str, torch.Tensor]]
    modality: list[list[int]]  # each row's real positions' modality codes
    run: Callable[..., Any]
    reference_inputs: Callable[[int], dict[str, Any]]  # extra inputs of a full forward over `total` columns
    explicit_positions: bool


@functools.cache
def _model(family: str, impl: str) -> torch.nn.Module:
    # shared between tests: a session leaves the model exactly as found
    if family == "llama":
        return tiny_models.build("llama", impl, seed=3)
    if family == "llava":
        return tiny_vlms.build_vlm("llava", impl, seed=3)
    return tiny_qwen_vlms.build("qwen2_vl", impl, seed=3)


def make_batch(family: str, impl: str) -> Batch:
    model = _model(family, impl)
    if family == "llama":
        ids, mask, prompts = tiny_models.left_padded([19, 27], seed=4)
        return Batch(
            family,
            model,
            {"input_ids": ids, "attention_mask": mask},
            [{"input_ids": p, "attention_mask": torch.ones_like(p)} for p in prompts],
            [[Modality.TEXT] * p.shape[1] for p in prompts],
            lambda inputs, **kw: tiny_models.generate(model, inputs["input_ids"], inputs["attention_mask"], **kw),
            lambda total: {},
            True,
        )
    if family == "llava":
        vlm_prompts = [
            tiny_vlms.make_prompt("llava", model, 1, seed=5, text_lengths=[10, 6]),
            tiny_vlms.make_prompt("llava", model, 2, seed=6, text_lengths=[4, 3, 7]),
        ]
        ids, mask, pixels = tiny_vlms.left_pad_batch("llava", vlm_prompts)
        return Batch(
            family,
            model,
            {"input_ids": ids, "attention_mask": mask, **pixels},
            [p.inputs() for p in vlm_prompts],
            [list(p.modality) for p in vlm_prompts],
            lambda inputs, **kw: tiny_vlms.generate_vlm(model, inputs, **kw),
            lambda total: dict(pixels),
            True,
        )
    qwen_prompts = [
        tiny_qwen_vlms.prompt(model, [6, ("image", (4, 4)), 7], seed=5),
        tiny_qwen_vlms.prompt(model, [3, ("image", (2, 4)), 2, ("image", (4, 2)), 9], seed=6),
    ]
    inputs = tiny_qwen_vlms.batch(qwen_prompts)
    return Batch(
        family,
        model,
        inputs,
        qwen_prompts,
        [[int(t) for t in p["mm_token_type_ids"][0]] for p in qwen_prompts],
        lambda inputs, **kw: tiny_qwen_vlms.generate(model, inputs, **kw),
        lambda total: tiny_qwen_vlms.reference_inputs(inputs, total),
        False,
    )


def _innermost(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("inner", {"strategy": "snapkv"})
    inner = {"strategy": inner} if isinstance(inner, str) else inner
    return _innermost(inner) if "inner" in inner or inner["strategy"] in ("pyramid", "mixkv") else inner


def _window(inner: dict[str, Any], n: int) -> int:
    """The window the innermost strategy protects for a budget ``n`` (its definition)."""
    name, size = inner["strategy"], inner.get("window_size")
    if name == "snapkv":
        return min(32 if size is None else size, n)
    if name in ("h2o", "lookm-pivotal"):
        return min(n // 2 if size is None else size, n)
    if name in ("knorm", "tova"):
        return min(size or 0, n)
    return 0


def expected_counts(config: dict[str, Any], modality: list[int], layers: int) -> list[int] | None:
    """Entries each layer keeps of a row (``None``: only the total is defined in advance, vl-cache)."""
    strategy = config["strategy"]
    if strategy == "mixkv":  # the inner strategy's budgets
        inner = config["inner"]
        return expected_counts({"strategy": inner} if isinstance(inner, str) else inner, modality, layers)
    if strategy == "vl-cache":
        return None
    length = len(modality)
    if strategy == "modality-budget":
        vision = sum(1 for c in modality if c != Modality.TEXT)
        text = length - vision
        n_vision = int(vision * (1 - config.get("vision_ratio", RATIO)))
        n_text = int(text * (1 - config.get("text_ratio", RATIO)))
        return [n_vision + n_text or 1] * layers
    budget = min(n_keep_for(length, RATIO), length)
    if strategy == "pyramid":
        reserved = max(_window(_innermost(config), budget), 1)
        return [reserved + p for p in naive_pyramid(budget - reserved, layers, length - reserved, 20.0, "line")]
    return [budget] * layers


WRAPPERS: list[dict[str, Any]] = [
    {"strategy": "pyramid", "inner": {"strategy": "snapkv", "window_size": 4}},
    {"strategy": "pyramid", "inner": "h2o"},  # decode-time eviction within each layer's own budget
    {"strategy": "pyramid", "inner": "lookm-pivotal"},  # merging (no masked reference)
    {"strategy": "modality-budget", "inner": "knorm", "vision_ratio": 0.9, "text_ratio": 0.3},
    {"strategy": "modality-budget", "inner": "h2o", "vision_ratio": 0.95},
    {"strategy": "mixkv", "inner": {"strategy": "snapkv", "window_size": 4}},
    {"strategy": "mixkv", "inner": {"strategy": "pyramid", "inner": "tova"}},
    {"strategy": "mixkv", "inner": "vl-cache"},  # deferred plans through a wrapper
]
# every wrapper on every family; eager on every family for the per-layer budgets with decode eviction
CASES = [(config, family, "sdpa") for config in WRAPPERS for family in FAMILIES]
CASES += [(WRAPPERS[1], family, "eager") for family in FAMILIES]
CASES += [(WRAPPERS[i], FAMILIES[i % 3], "eager") for i in (0, 3, 6, 7)]


def _id(case: tuple[dict[str, Any], str, str]) -> str:
    config, family, impl = case
    inner = config["inner"]
    inner_name = inner if isinstance(inner, str) else inner["strategy"] + ("-" + str(inner.get("inner", "")))
    return f"{config['strategy']}({inner_name})-{family}-{impl}"


def _merges(config: dict[str, Any]) -> bool:
    return _innermost(config)["strategy"] == "lookm-pivotal"


def _decode_evicts(config: dict[str, Any]) -> bool:
    inner = _innermost(config)
    return inner["strategy"] == "h2o" and inner.get("decode_eviction", True)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_wrapper_generates_with_its_budgets_and_matches_the_reference(case: tuple[dict[str, Any], str, str]) -> None:
    config, family, impl = case
    batch = make_batch(family, impl)
    ratio = {} if "text_ratio" in config else {"compression_ratio": RATIO}
    compressor = Compressor.from_config({**config, **ratio})
    recorder = PlanRecorder()
    with recorder.recording(), compressor(batch.model) as session:
        out = batch.run(batch.inputs, max_new_tokens=NEW_TOKENS)
        report = session.report
        singles = [batch.run(single, max_new_tokens=NEW_TOKENS) for single in batch.singles]
    cache = cache_of(out)
    layers = len(cache.layers)
    plans = recorder.per_layer(cache)
    assert sorted(plans) == list(range(layers))
    lengths = [len(m) for m in batch.modality]
    assert report.prompt_lengths == tuple(lengths)
    kept = [[int(n) for n in plans[layer][0].slot_valid.sum(-1).tolist()] for layer in range(layers)]
    for row, modality in enumerate(batch.modality):
        row_kept = [k[row] for k in kept]
        expected = expected_counts({**config, **ratio}, modality, layers)
        if expected is not None:
            assert row_kept == expected, f"row {row}: layers keep {row_kept}, expected {expected}"
        assert sum(row_kept) == layers * report.n_keep[row], "the total over the layers is exact"
    if "pyramid" in repr(config):  # teeth: the layers really keep different budgets
        assert all(len(set(row)) > 1 for row in zip(*kept, strict=True))
    # decoding: each layer keeps its own length (h2o evicts back to it after every step)
    width = batch.inputs["input_ids"].shape[1]
    for layer in range(layers):
        after = plans[layer][0].length_after
        steps = plans[layer][1:]
        assert len(steps) == (NEW_TOKENS - 1 if _decode_evicts(config) else 0)
        assert all((s.length_before, s.length_after) == (after + 1, after) for s in steps)
        final = after if _decode_evicts(config) else after + NEW_TOKENS - 1
        assert cache.layers[layer].keys.shape[-2] == final
    # each row generates what it generates alone
    logits = torch.stack(out.logits)
    for row, single in enumerate(singles):
        assert torch.equal(out.sequences[row, width:], single.sequences[0, -NEW_TOKENS:])
        assert (logits[:, row] - torch.stack(single.logits)[:, 0]).abs().max().item() < ATOL
    if _merges(config):
        return
    # the masked no-cache reference, per layer and KV head
    seq = out.sequences[:, :-1]
    mask = torch.cat([batch.inputs["attention_mask"], torch.ones(2, NEW_TOKENS - 1, dtype=torch.long)], 1)
    calls = [1] * (NEW_TOKENS - 1)
    visibility = {
        layer: compressed_visibility(plans[layer], mask, width, calls, _decode_evicts(config))
        for layer in range(layers)
    }
    extra = batch.reference_inputs(seq.shape[1])
    reference = masked_logits(batch.model, seq, mask, visibility, extra, batch.explicit_positions)
    plain = masked_logits(
        batch.model, seq, mask, dict.fromkeys(range(layers), plain_visibility(mask)), extra, batch.explicit_positions
    )
    assert (logits - decode_step_logits(reference, width, NEW_TOKENS)).abs().max().item() < ATOL
    assert (logits[1:] - decode_step_logits(plain, width, NEW_TOKENS)[1:]).abs().max().item() > TEETH


NOOPS: list[dict[str, Any]] = [
    {"strategy": "pyramid", "inner": "h2o", "compression_ratio": 0.0},
    {"strategy": "mixkv", "inner": "vl-cache", "compression_ratio": 0.0},
    {"strategy": "modality-budget", "inner": "snapkv", "vision_ratio": 0.0, "text_ratio": 0.0},
    {"strategy": "pyramid", "inner": "full", "compression_ratio": 0.9},
]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "llava"])
@pytest.mark.parametrize("config", NOOPS, ids=lambda c: f"{c['strategy']}({c['inner']})")
def test_no_op_wrappers_are_bit_identical(config: dict[str, Any], family: str, impl: str) -> None:
    batch = make_batch(family, impl)
    compressor = Compressor.from_config(config)
    assert compressor.is_noop
    reference = batch.run(batch.inputs, max_new_tokens=NEW_TOKENS)
    with compressor(batch.model) as session:
        out = batch.run(batch.inputs, max_new_tokens=NEW_TOKENS)
    assert session.report.layers_compressed == 0
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits, strict=True):
        assert torch.equal(got, want)
    for got_layer, want_layer in zip(cache_of(out).layers, cache_of(reference).layers, strict=True):
        assert torch.equal(got_layer.keys, want_layer.keys) and torch.equal(got_layer.values, want_layer.values)
