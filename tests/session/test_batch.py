"""Left-padded batches: every row generates what it generates alone; padding is never kept."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvpress_mm import Compressor
from tests.helpers.masked_reference import PlanRecorder, cache_of
from tests.helpers.tiny_models import build, generate, left_padded

ATOL = 1e-4
LENGTHS = [21, 34, 27]
NEW_TOKENS = 5
RATIO = 0.6

# `random` draws each row's scores over its own real entries, so it is batch-invariant too.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("random", {}),
    ("streaming", {}),
    ("h2o", {}),
    ("h2o", {"decode_eviction": False}),
    ("snapkv", {"window_size": 4}),
    ("lookm-evict", {}),
    ("lookm-average", {}),
    ("lookm-pivotal", {}),
    ("lookm-weighted", {}),
]


def _ids(case: tuple[str, dict[str, Any]]) -> str:
    name, config = case
    return name + "".join(f"-{k}={v}" for k, v in config.items())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_batch_rows_equal_single_runs(case: tuple[str, dict[str, Any]], impl: str) -> None:
    name, config = case
    family = "llama" if impl == "sdpa" else "qwen2"
    model = build(family, impl, seed=11)
    ids, mask, prompts = left_padded(LENGTHS, seed=12)
    width = ids.shape[1]
    compressor = Compressor.from_name(name, compression_ratio=RATIO, **config)
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model) as session:
        batch = generate(model, ids, mask, max_new_tokens=NEW_TOKENS)
        report = session.report
        singles = [generate(model, p, max_new_tokens=NEW_TOKENS) for p in prompts]
    budgets = tuple(int(n * (1 - RATIO)) for n in LENGTHS)
    assert report.prompt_lengths == tuple(LENGTHS)
    assert report.n_keep == budgets

    batch_logits = torch.stack(batch.logits)  # [steps, B, V]
    batch_scores = torch.stack(batch.scores)
    for row, single in enumerate(singles):
        assert torch.equal(batch.sequences[row, width:], single.sequences[0, -NEW_TOKENS:])
        assert (batch_logits[:, row] - torch.stack(single.logits)[:, 0]).abs().max().item() < ATOL
        assert (batch_scores[:, row] - torch.stack(single.scores)[:, 0]).abs().max().item() < ATOL

    # padding is never kept: every valid slot of every recorded plan points at a real token
    cache = cache_of(batch)
    decode_evicts = name == "h2o" and config.get("decode_eviction", True)
    real = mask.bool()
    for layer_plans in recorder.per_layer(cache).values():
        prefill = layer_plans[0]
        assert prefill.length_before == width
        kept_real = real.gather(1, prefill.kept_indices.flatten(1)).view_as(prefill.kept_indices)
        assert kept_real[prefill.slot_valid[:, None, :].expand_as(kept_real)].all()
        # each row keeps its own budget; shorter rows get filler slots at the front
        assert prefill.slot_valid.sum(-1).tolist() == list(budgets)
        assert prefill.kept_indices.shape[-1] == max(budgets)
        if decode_evicts:
            assert len(layer_plans) == NEW_TOKENS  # prefill + one eviction per decode step
            for step in layer_plans[1:]:
                # filler slots stay filler, at the front
                assert step.slot_valid.sum(-1).tolist() == list(budgets)
    final = max(budgets) if decode_evicts else max(budgets) + NEW_TOKENS - 1
    assert all(layer.keys.shape[-2] == final for layer in cache.layers)

    # teeth: the compressed batch really differs from the uncompressed one
    plain = generate(model, ids, mask, max_new_tokens=NEW_TOKENS)
    assert (batch_logits[1:] - torch.stack(plain.logits)[1:]).abs().max().item() > 1e-3
