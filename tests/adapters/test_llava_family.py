"""LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision and InternVL under compression, end to end.

Tiny random models (tiny_vlms.py), sdpa and eager, every built-in strategy. The masked
no-cache reference (masked_reference.py) runs the same model on prompt + generated tokens
with the pixel inputs, hiding from each decode query the entries its layer's KV head evicted.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvpress_mm import Compressor, LayerView, Modality, ScoredCompressor
from kvpress_mm.registry import find_adapter
from kvpress_mm.strategies import BUILTIN_STRATEGIES
from tests.helpers.budgets import assert_layer_budgets
from tests.helpers.masked_reference import (
    PlanRecorder,
    cache_of,
    compressed_visibility,
    decode_step_logits,
    kept_prompt_columns,
    masked_logits,
    plain_visibility,
)
from tests.helpers.tiny_models import assert_same_model_state, hook_count, model_snapshot
from tests.helpers.tiny_vlms import (
    FAMILIES,
    IMAGE,
    IMG_END,
    IMG_START,
    PAD,
    VIDEO,
    VLMPrompt,
    build_vlm,
    generate_vlm,
    left_pad_batch,
    make_prompt,
)

ATOL = 1e-4
TEETH = 1e-3
IMPLS = ["sdpa", "eager"]
RATIOS = [0.5, 0.9]
NEW_TOKENS = 3
EVICTION_ONLY = {"random", "streaming", "h2o", "snapkv", "lookm-evict", "tova", "knorm", "vl-cache"}
# snapkv's default window (32) would cover most of a tiny prompt
CONFIGS: dict[str, dict[str, Any]] = {"snapkv": {"window_size": 4}}
IMAGE_COUNTS = (1, 3, 0)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _n_keep(length: int, ratio: float) -> int:
    return max(1, int(length * (1 - ratio)))


def _reference(
    model: torch.nn.Module,
    out: Any,
    plans: dict[int, list[Any]],
    mask: torch.Tensor,
    pixels: dict[str, torch.Tensor],
    decode_plans: bool,
    new_tokens: int = NEW_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked reference, unmasked reference)`` decode-step logits ``[steps, B, V]``."""
    width = mask.shape[1]
    seq = out.sequences[:, :-1]
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], new_tokens - 1, dtype=mask.dtype)], dim=1)
    calls = [1] * (new_tokens - 1)
    visibility = {layer: compressed_visibility(p, full_mask, width, calls, decode_plans) for layer, p in plans.items()}
    reference = masked_logits(model, seq, full_mask, visibility, extra_inputs=pixels)
    n_layers = len(plans)
    plain = masked_logits(
        model, seq, full_mask, dict.fromkeys(range(n_layers), plain_visibility(full_mask)), extra_inputs=pixels
    )
    return decode_step_logits(reference, width, new_tokens), decode_step_logits(plain, width, new_tokens)


# -- every strategy, every family: cache sizes and the masked reference ------------------------


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", BUILTIN_STRATEGIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_keeps_n_keep_and_matches_reference(family: str, name: str, impl: str, ratio: float) -> None:
    # 1, 3 and 0 images in turn: every family x impl sees each count with six strategy/ratio pairs
    n_images = IMAGE_COUNTS[(BUILTIN_STRATEGIES.index(name) + RATIOS.index(ratio)) % len(IMAGE_COUNTS)]
    model = build_vlm(family, impl, seed=FAMILIES.index(family))
    prompt = make_prompt(family, model, n_images, seed=n_images + 2 * RATIOS.index(ratio))
    length = prompt.length
    compressor = Compressor.from_name(name, compression_ratio=ratio, **CONFIGS.get(name, {}))
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model) as session:
        out = generate_vlm(model, prompt.inputs(), max_new_tokens=NEW_TOKENS)
    cache = cache_of(out)
    n_layers = len(cache.layers)
    assert out.sequences.shape == (1, length + NEW_TOKENS)
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert session.report.prompt_lengths == (length,)
    plans = recorder.per_layer(cache)
    decode_evicts = name == "h2o"  # decode_eviction defaults to True
    if name == "full":
        assert plans == {}
        assert all(layer.keys.shape[-2] == length + NEW_TOKENS - 1 for layer in cache.layers)
        return
    n_keep = _n_keep(length, ratio)
    assert session.report.n_keep == (n_keep,)
    assert session.report.layers_compressed == n_layers
    assert sorted(plans) == list(range(n_layers))
    assert_layer_budgets(name, [p[0].length_after for p in plans.values()], n_keep, length)
    for layer_plans in plans.values():
        assert layer_plans[0].length_before == length
        assert layer_plans[0].merged == (name.startswith("lookm-") and name != "lookm-evict")
        # h2o evicts one entry per decode step: the cache stays at n_keep while decoding
        assert len(layer_plans) == (NEW_TOKENS if decode_evicts else 1)
        for step in layer_plans[1:]:
            assert (step.length_before, step.length_after) == (n_keep + 1, n_keep)
    for i, layer in enumerate(cache.layers):
        kept = plans[i][0].length_after
        final = kept if decode_evicts else kept + NEW_TOKENS - 1
        assert layer.keys.shape[-2] == final and layer.values.shape[-2] == final
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
    if name not in EVICTION_ONLY:
        return
    mask = torch.ones_like(prompt.input_ids)
    reference, unmasked = _reference(model, out, plans, mask, prompt.pixels, decode_plans=decode_evicts)
    got = torch.stack(out.logits)
    assert _max_diff(got, reference) < ATOL
    # teeth: the evicted entries matter (the first token comes from the full prefill)
    assert _max_diff(got[1:], unmasked[1:]) > TEETH


# -- OneVision video: VIDEO entries, compressed like images -------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["snapkv", "h2o", "lookm-evict"])
def test_onevision_image_and_video_prompt_matches_reference(name: str, impl: str) -> None:
    model = build_vlm("llava_onevision", impl, seed=5)
    prompt = make_prompt("llava_onevision", model, 1, seed=1, video_frames=3)
    assert prompt.video_counts and prompt.video_counts[0] > 1
    compressor = Compressor.from_name(name, compression_ratio=0.6, **CONFIGS.get(name, {}))
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model) as session:
        out = generate_vlm(model, prompt.inputs(), max_new_tokens=NEW_TOKENS)
    n_keep = _n_keep(prompt.length, 0.6)
    assert session.report.n_keep == (n_keep,)
    plans = recorder.per_layer(cache_of(out))
    reference, unmasked = _reference(
        model, out, plans, torch.ones_like(prompt.input_ids), prompt.pixels, decode_plans=name == "h2o"
    )
    got = torch.stack(out.logits)
    assert _max_diff(got, reference) < ATOL
    assert _max_diff(got[1:], unmasked[1:]) > TEETH
    if name == "lookm-evict":
        # the text prior treats video entries like image entries: text outside the window first
        modality = torch.tensor(prompt.modality)
        window = n_keep // 2
        outside = prompt.length - window
        n_text = int((modality[:outside] == 0).sum())
        assert n_keep - window <= n_text, "the budget outside the window is all text"
        for columns in (c for p in plans.values() for c in kept_prompt_columns(p)[0]):
            kept_outside = columns[columns < outside]
            assert (modality[kept_outside] == 0).all()


# -- batches: each row as if alone ---------------------------------------------------------------

# (images in row 0, images in row 1): different image counts and lengths
BATCH_PAIRS = [(1, 3), (3, 0), (0, 1)]


def _batch_prompts(family: str, model: torch.nn.Module, pair: tuple[int, int]) -> list[VLMPrompt]:
    first = make_prompt(family, model, pair[0], seed=11, text_lengths=[12] + [4] * pair[0])
    second = make_prompt(family, model, pair[1], seed=12, text_lengths=[5] + [7] * pair[1])
    assert first.length != second.length
    return [first, second]


BATCH_CASES = [(name, "sdpa") for name in BUILTIN_STRATEGIES]
BATCH_CASES += [(name, "eager") for name in ("h2o", "snapkv", "lookm-pivotal")]


@pytest.mark.parametrize(("name", "impl"), BATCH_CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_rows_equal_single_runs(family: str, name: str, impl: str) -> None:
    model = build_vlm(family, impl, seed=7)
    pair = BATCH_PAIRS[BUILTIN_STRATEGIES.index(name) % len(BATCH_PAIRS)]
    prompts = _batch_prompts(family, model, pair)
    ids, mask, pixels = left_pad_batch(family, prompts)
    width = ids.shape[1]
    compressor = Compressor.from_name(name, compression_ratio=0.6, **CONFIGS.get(name, {}))
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model) as session:
        batch = generate_vlm(model, {"input_ids": ids, "attention_mask": mask, **pixels}, max_new_tokens=NEW_TOKENS)
        report = session.report
        singles = [generate_vlm(model, p.inputs(), max_new_tokens=NEW_TOKENS) for p in prompts]
    lengths = tuple(p.length for p in prompts)
    assert report.prompt_lengths == lengths
    budgets = lengths if name == "full" else tuple(_n_keep(n, 0.6) for n in lengths)
    assert report.n_keep == budgets
    batch_logits = torch.stack(batch.logits)
    for row, single in enumerate(singles):
        assert torch.equal(batch.sequences[row, width:], single.sequences[0, -NEW_TOKENS:])
        assert _max_diff(batch_logits[:, row], torch.stack(single.logits)[:, 0]) < ATOL
    if name == "full":
        return
    # padding is never kept; each row keeps its own budget
    kept = []
    for layer_plans in recorder.per_layer(cache_of(batch)).values():
        prefill = layer_plans[0]
        assert prefill.length_before == width
        kept_real = mask.bool().gather(1, prefill.kept_indices.flatten(1)).view_as(prefill.kept_indices)
        assert kept_real[prefill.slot_valid[:, None, :].expand_as(kept_real)].all()
        kept.append(prefill.slot_valid.sum(-1).tolist())
    for row, (n_keep, length) in enumerate(zip(budgets, lengths, strict=True)):
        assert_layer_budgets(name, [k[row] for k in kept], n_keep, length)
    # teeth: the compressed batch differs from the uncompressed one
    plain = generate_vlm(model, {"input_ids": ids, "attention_mask": mask, **pixels}, max_new_tokens=NEW_TOKENS)
    assert _max_diff(batch_logits[1:], torch.stack(plain.logits)[1:]) > TEETH


# -- LOOK-M's text prior on real image spans -------------------------------------------------------


def _accumulated_attention(model: torch.nn.Module, prompt: VLMPrompt) -> list[torch.Tensor]:
    """Per layer ``[kv_heads, L]``: column sums of the eager attention, averaged over each KV group."""
    with torch.no_grad():
        attentions = model(**prompt.inputs(), output_attentions=True).attentions
    config: Any = model.config.get_text_config()  # type: ignore[union-attr,operator]
    groups = config.num_attention_heads // config.num_key_value_heads
    scores = []
    for attention in attentions:  # [1, H, L, L]
        columns = attention[0].double().sum(1)  # [H, L]
        scores.append(columns.view(-1, groups, columns.shape[-1]).mean(1))
    return scores


WINDOW = 3
SCORE_TOL = 1e-5


@pytest.mark.parametrize("name", ["lookm-evict", "lookm-pivotal"])
@pytest.mark.parametrize("budget", ["below-text", "above-text"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lookm_text_prior_on_image_spans(family: str, budget: str, name: str) -> None:
    model = build_vlm(family, "eager", seed=3)
    prompt = make_prompt(family, model, 3, seed=4, text_lengths=[9, 6, 5, 4])
    length = prompt.length
    modality = torch.tensor(prompt.modality)
    outside = length - WINDOW
    text = (modality[:outside] == 0).nonzero().squeeze(-1)
    images = (modality[:outside] == 1).nonzero().squeeze(-1)
    assert len(text) >= 8 and len(images) >= 8
    n_keep = WINDOW + (len(text) // 2 if budget == "below-text" else len(text) + len(images) // 2)
    ratio = 1 - (n_keep + 0.5) / length
    assert int(length * (1 - ratio)) == n_keep

    scores = _accumulated_attention(model, prompt)
    compressor = Compressor.from_name(name, compression_ratio=ratio, window_size=WINDOW)
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model):
        out = generate_vlm(model, prompt.inputs(), max_new_tokens=2)
    plans = recorder.per_layer(cache_of(out))
    prior_mattered = False
    for layer, layer_plans in plans.items():
        for head, columns in enumerate(kept_prompt_columns(layer_plans)[0]):
            assert len(columns) == n_keep
            assert columns[-WINDOW:].tolist() == list(range(outside, length)), "the window is kept"
            kept = set(columns[columns < outside].tolist())
            score = scores[layer][head]
            if budget == "below-text":
                # no image entry outside the window survives; the text kept is the best-scoring text
                assert kept <= set(text.tolist())
                pool = text
            else:
                # every text entry survives; the rest are the best-scoring image entries
                assert set(text.tolist()) <= kept
                pool = images
            chosen = [int(i) for i in pool if int(i) in kept]
            dropped = [int(i) for i in pool if int(i) not in kept]
            assert len(chosen) == n_keep - WINDOW - (0 if budget == "below-text" else len(text))
            assert float(score[chosen].min()) >= float(score[dropped].max()) - SCORE_TOL
            # teeth: a plain top-k on the same scores (h2o) would have chosen differently
            plain = set(score[:outside].topk(n_keep - WINDOW).indices.tolist())
            prior_mattered |= plain != kept
    assert prior_mattered, "the text prior should change the selection somewhere"


# -- continuing a conversation on a compressed cache ----------------------------------------------

FIRST, EXTRA, SECOND = 3, 3, 3


def _continue(
    model: torch.nn.Module, compressor: Compressor, ids: torch.Tensor, mask: torch.Tensor, pixels: dict[str, Any]
) -> tuple[Any, Any, torch.Tensor, PlanRecorder]:
    b = ids.shape[0]
    extra = torch.randint(3, 240, (b, EXTRA), generator=torch.Generator().manual_seed(5))
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model):
        first = generate_vlm(model, {"input_ids": ids, "attention_mask": mask, **pixels}, max_new_tokens=FIRST)
        cache = cache_of(first)
        # only what the cache has not seen: the last generated token and the new turn
        new_ids = torch.cat([first.sequences[:, -1:], extra], dim=1)
        history_mask = torch.cat([mask, torch.ones(b, FIRST + EXTRA, dtype=mask.dtype)], dim=1)
        second = generate_vlm(
            model, {"input_ids": new_ids, "attention_mask": history_mask}, max_new_tokens=SECOND, cache=cache
        )
    return first, second, extra, recorder


CONTINUE_CASES = [(f, "sdpa", False) for f in FAMILIES] + [("llava", "eager", False), ("llava", "sdpa", True)]


@pytest.mark.parametrize("name", ["snapkv", "h2o"])
@pytest.mark.parametrize(("family", "impl", "batched"), CONTINUE_CASES)
def test_second_generate_continues_compressed_cache(family: str, impl: str, batched: bool, name: str) -> None:
    model = build_vlm(family, impl, seed=8)
    if batched:
        ids, mask, pixels = left_pad_batch(family, _batch_prompts(family, model, (1, 3)))
    else:
        prompt = make_prompt(family, model, 2, seed=6)
        ids, mask, pixels = prompt.input_ids, torch.ones_like(prompt.input_ids), prompt.pixels
    compressor = Compressor.from_name(name, compression_ratio=0.6, **CONFIGS.get(name, {}))
    first, second, extra, recorder = _continue(model, compressor, ids, mask, pixels)
    b, width = ids.shape
    assert second.sequences.shape == (b, 1 + EXTRA + SECOND)
    plans = recorder.per_layer(cache_of(first))

    seq = torch.cat([first.sequences, extra, second.sequences[:, -SECOND:-1]], dim=1)
    full_mask = torch.cat([mask, torch.ones(b, seq.shape[1] - width, dtype=mask.dtype)], dim=1)
    calls = [1] * (FIRST - 1) + [1 + EXTRA] + [1] * (SECOND - 1)
    decode_plans = name == "h2o"
    visibility = {layer: compressed_visibility(p, full_mask, width, calls, decode_plans) for layer, p in plans.items()}
    start = width + FIRST + EXTRA
    window = slice(start - 1, start - 1 + SECOND)
    reference = masked_logits(model, seq, full_mask, visibility, extra_inputs=pixels)[:, window].transpose(0, 1)
    got = torch.stack(second.logits)
    assert _max_diff(got, reference) < ATOL
    plain = {layer: plain_visibility(full_mask) for layer in plans}
    unmasked = masked_logits(model, seq, full_mask, plain, extra_inputs=pixels)[:, window].transpose(0, 1)
    assert _max_diff(got, unmasked) > TEETH


@pytest.mark.parametrize("with_pixels", [False, True], ids=["text-only", "pixels-again"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_history_on_compressed_cache_raises(family: str, with_pixels: bool) -> None:
    from kvpress_mm.errors import InvalidInputError

    model = build_vlm(family, "sdpa", seed=8)
    prompt = make_prompt(family, model, 1, seed=6)
    mask = torch.ones_like(prompt.input_ids)
    with Compressor.from_name("snapkv", compression_ratio=0.6, window_size=4)(model):
        first = generate_vlm(model, prompt.inputs(), max_new_tokens=FIRST)
        cache = cache_of(first)
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        extra = torch.randint(3, 240, (1, EXTRA), generator=torch.Generator().manual_seed(5))
        history = torch.cat([first.sequences, extra], dim=1)
        history_mask = torch.cat([mask, torch.ones(1, FIRST + EXTRA, dtype=mask.dtype)], dim=1)
        inputs = {"input_ids": history, "attention_mask": history_mask}
        if with_pixels:
            inputs.update(prompt.pixels)
        with pytest.raises(InvalidInputError, match="only the tokens it has not seen"):
            generate_vlm(model, inputs, max_new_tokens=2, cache=cache)
        assert [layer.keys.shape[-2] for layer in cache.layers] == lengths


@pytest.mark.parametrize("family", FAMILIES)
def test_second_turn_with_a_new_image_continues_compressed_cache(family: str) -> None:
    """A new image in the second turn: its features land on its placeholders, positions stay absolute."""
    from kvpress_mm.errors import InvalidInputError
    from tests.helpers.tiny_vlms import image_pixels

    model = build_vlm(family, "sdpa", seed=10)
    prompt = make_prompt(family, model, 1, seed=2)
    pixels, counts, _ = image_pixels(family, model, 1, seed=3)
    span = [IMAGE] * counts[0]
    if family == "internvl":
        span = [IMG_START, *span, IMG_END]
    turn = torch.tensor([[11, 12, *span, 13, 14]])
    compressor = Compressor.from_name("snapkv", compression_ratio=0.6, window_size=4)
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model):
        first = generate_vlm(model, prompt.inputs(), max_new_tokens=FIRST)
        cache = cache_of(first)
        new_ids = torch.cat([first.sequences[:, -1:], turn], dim=1)
        history_mask = torch.ones(1, first.sequences.shape[1] + turn.shape[1], dtype=torch.long)
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        # placeholders that do not match the new image: refused, cache untouched
        keep = torch.ones(new_ids.shape[1], dtype=torch.bool)
        keep[(new_ids[0] == IMAGE).nonzero()[0]] = False
        short = new_ids[:, keep]  # one placeholder fewer
        with pytest.raises(InvalidInputError, match=f"need {counts[0]} image placeholder tokens"):
            generate_vlm(model, {"input_ids": short, "attention_mask": history_mask[:, :-1], **pixels}, cache=cache)
        assert [layer.keys.shape[-2] for layer in cache.layers] == lengths
        second = generate_vlm(
            model, {"input_ids": new_ids, "attention_mask": history_mask, **pixels}, max_new_tokens=SECOND, cache=cache
        )
    plans = recorder.per_layer(cache)
    seq = torch.cat([first.sequences, turn, second.sequences[:, -SECOND:-1]], dim=1)
    full_mask = torch.ones_like(seq)
    # both images, in prompt order (each treated as a single-image row, as in its own call)
    both: dict[str, torch.Tensor] = {}
    for name in ("pixel_values", "image_sizes"):
        if name in pixels:
            parts = [prompt.pixels[name], pixels[name]]
            if parts[0].dim() == 5:
                most = max(int(t.shape[1]) for t in parts)
                parts = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, most - int(t.shape[1]))) for t in parts]
            both[name] = torch.cat(parts)
    width = prompt.length
    calls = [1] * (FIRST - 1) + [1 + turn.shape[1]] + [1] * (SECOND - 1)
    visibility = {layer: compressed_visibility(p, full_mask, width, calls, False) for layer, p in plans.items()}
    start = width + FIRST + turn.shape[1]
    window = slice(start - 1, start - 1 + SECOND)
    reference = masked_logits(model, seq, full_mask, visibility, extra_inputs=both)[:, window].transpose(0, 1)
    got = torch.stack(second.logits)
    assert _max_diff(got, reference) < ATOL
    # teeth: the new image's features matter (a different image gives different logits)
    other = {**both, "pixel_values": both["pixel_values"].clone()}
    other["pixel_values"][-1] = torch.randn_like(other["pixel_values"][-1])
    changed = masked_logits(model, seq, full_mask, visibility, extra_inputs=other)[:, window].transpose(0, 1)
    assert _max_diff(got, changed) > TEETH


# -- the modality map -------------------------------------------------------------------------------

_SEEN_MODALITY: list[torch.Tensor] = []


class _RecordModality(ScoredCompressor):
    """Keeps the first entries; records the modality map the session hands to strategies."""

    def score(self, layer: LayerView) -> torch.Tensor:
        _SEEN_MODALITY.append(layer.modality.clone())
        return -torch.arange(layer.seq_len, dtype=torch.float32).expand(layer.batch_size, layer.kv_heads, -1)


@pytest.mark.parametrize("family", FAMILIES)
def test_modality_map_marks_image_video_text_and_padding(family: str) -> None:
    model = build_vlm(family, "sdpa", seed=2)
    video = 2 if family == "llava_onevision" else None
    prompts = [
        make_prompt(family, model, 3, seed=1, text_lengths=[4, 3, 5, 2] + ([3] if video else []), video_frames=video),
        make_prompt(family, model, 1, seed=2, text_lengths=[6, 3]),
    ]
    ids, mask, pixels = left_pad_batch(family, prompts)
    width = ids.shape[1]
    # the expected map, from where the builder put each span (not from token ids)
    expected = torch.full((2, width), int(Modality.PADDING), dtype=torch.int8)
    for row, prompt in enumerate(prompts):
        expected[row, width - prompt.length :] = torch.tensor(prompt.modality, dtype=torch.int8)
    adapter = find_adapter(model)
    inputs = {"input_ids": ids, "attention_mask": mask, **pixels}
    got = adapter.modality_map(model, inputs, width)
    assert torch.equal(got, expected)
    config: Any = model.config
    assert int((got == Modality.IMAGE).sum()) == int(((ids == config.image_token_id) & mask.bool()).sum())
    assert int((got == Modality.IMAGE).sum()) == sum(sum(p.image_counts) for p in prompts)
    assert int((got == Modality.VIDEO).sum()) == sum(sum(p.video_counts) for p in prompts)
    if video:
        assert int((got == Modality.VIDEO).sum()) > 0
        assert bool((got[ids == VIDEO] == Modality.VIDEO).all())
    if family == "internvl":
        delimiters = (ids == IMG_START) | (ids == IMG_END)
        assert int(delimiters.sum()) == 2 * 4
        assert bool((got[delimiters] == Modality.TEXT).all()), "<img> and </img> are text"
    assert bool((got[ids == PAD] == Modality.PADDING).all())
    assert int((got == Modality.PADDING).sum()) == int((mask == 0).sum()) > 0
    # ... and the session hands exactly this map to the strategy
    _SEEN_MODALITY.clear()
    with _RecordModality(compression_ratio=0.5)(model):
        generate_vlm(model, inputs, max_new_tokens=1)
    assert len(_SEEN_MODALITY) == len(model.get_decoder().layers)  # type: ignore[operator]
    for seen in _SEEN_MODALITY:
        assert torch.equal(seen, expected)
    assert IMAGE == config.image_token_id


# -- bad input: clear errors, raised before anything runs, model left as found ------------------


def _replace_one(ids: torch.Tensor, token: int, by: int, last: bool = False) -> torch.Tensor:
    ids = ids.clone()
    positions = (ids[0] == token).nonzero().squeeze(-1)
    ids[0, positions[-1] if last else positions[0]] = by
    return ids


def _drop_one_placeholder(prompt: VLMPrompt) -> dict[str, Any]:
    inputs = prompt.inputs()
    keep = torch.ones(prompt.length, dtype=torch.bool)
    keep[(prompt.input_ids[0] == IMAGE).nonzero()[0]] = False
    inputs["input_ids"] = prompt.input_ids[:, keep]
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def _extra_placeholder(prompt: VLMPrompt) -> dict[str, Any]:
    inputs = prompt.inputs()
    inputs["input_ids"] = torch.cat([prompt.input_ids, torch.tensor([[IMAGE]])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def _no_placeholders(prompt: VLMPrompt) -> dict[str, Any]:
    inputs = prompt.inputs()
    inputs["input_ids"] = prompt.input_ids.masked_fill(prompt.input_ids == IMAGE, 7)
    return inputs


def _no_pixels(prompt: VLMPrompt) -> dict[str, Any]:
    return {"input_ids": prompt.input_ids, "attention_mask": torch.ones_like(prompt.input_ids)}


BAD_INPUTS: dict[str, tuple[Any, str]] = {
    "pixels-without-placeholders": (_no_placeholders, "contain no image placeholder token"),
    "one-placeholder-missing": (_drop_one_placeholder, r"need \d+ image placeholder tokens .* but they contain"),
    "one-placeholder-too-many": (_extra_placeholder, r"need \d+ image placeholder tokens .* but they contain"),
    "placeholders-without-pixels": (_no_pixels, "no pixel_values"),
}


class _CountCalls:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *args: Any) -> None:
        self.calls += 1


def _assert_refused_up_front(
    model: torch.nn.Module, inputs: dict[str, Any], match: str, before_vision_in_generate: bool = False
) -> None:
    """The error names the problem, nothing ran, and the model is exactly as before.

    Through ``generate`` the refusal comes before the text decoder runs (generate encodes the
    images before the first forward; pixel-level problems are refused before that too, when
    ``before_vision_in_generate``); through a plain forward, before the vision tower runs.
    """
    from kvpress_mm.errors import InvalidInputError

    before, hooks = model_snapshot(model), hook_count(model)
    valid = _valid_inputs[id(model)]
    reference = generate_vlm(model, valid, max_new_tokens=2)
    inner: Any = model.model  # type: ignore[union-attr]
    vision, text = _CountCalls(inner.vision_tower), _CountCalls(inner.language_model)
    try:
        with Compressor.from_name("lookm-pivotal", compression_ratio=0.5)(model):
            with pytest.raises(InvalidInputError, match=match):
                generate_vlm(model, inputs, max_new_tokens=2)
            assert text.calls == 0, "refused before the text decoder ran"
            if before_vision_in_generate:
                assert vision.calls == 0, "refused before the vision tower ran"
            vision.calls = 0
            with pytest.raises(InvalidInputError, match=match), torch.no_grad():
                model(**inputs)
            assert (vision.calls, text.calls) == (0, 0), "refused before the vision tower or decoder ran"
            # the session still works after a refused call
            out = generate_vlm(model, valid, max_new_tokens=2)
            assert cache_of(out).layers[0].keys.shape[-2] == _n_keep(valid["input_ids"].shape[1], 0.5) + 1
    finally:
        vision.handle.remove()
        text.handle.remove()
    assert hook_count(model) == hooks  # (transformers' own output-capturing hooks stay)
    assert "get_image_features" not in vars(inner), "the adapter's instrumentation is gone"
    assert_same_model_state(before, model_snapshot(model))
    after = generate_vlm(model, valid, max_new_tokens=2)
    assert torch.equal(after.sequences, reference.sequences)
    for got, want in zip(after.logits, reference.logits, strict=True):
        assert torch.equal(got, want)


_valid_inputs: dict[int, dict[str, Any]] = {}


def _model_and_prompt(family: str, n_images: int = 2) -> tuple[torch.nn.Module, VLMPrompt]:
    model = build_vlm(family, "sdpa", seed=9)
    prompt = make_prompt(family, model, n_images, seed=3)
    _valid_inputs[id(model)] = prompt.inputs()
    return model, prompt


@pytest.mark.parametrize("scenario", list(BAD_INPUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_image_inputs_raise_clearly_and_leave_model_as_found(family: str, scenario: str) -> None:
    model, prompt = _model_and_prompt(family)
    make_inputs, match = BAD_INPUTS[scenario]
    _assert_refused_up_front(model, make_inputs(prompt), match, scenario == "placeholders-without-pixels")


@pytest.mark.parametrize("family", FAMILIES)
def test_image_split_across_rows_raises(family: str) -> None:
    """Totals right, but one image's placeholders straddle two rows: the model would mix them up."""
    model, _ = _model_and_prompt(family)
    prompts = [make_prompt(family, model, 1, seed=1), make_prompt(family, model, 1, seed=2)]
    ids, mask, pixels = left_pad_batch(family, prompts)
    # move one placeholder from row 1 to row 0 (the total stays right)
    ids[0] = torch.cat([ids[0, 1:], torch.tensor([IMAGE])])
    mask[0] = torch.cat([mask[0, 1:], torch.tensor([1])])
    ids[1] = _replace_one(ids[1:2], IMAGE, 7)[0]
    _assert_refused_up_front(model, {"input_ids": ids, "attention_mask": mask, **pixels}, "middle of a")


ANYRES_BAD: dict[str, tuple[Any, str]] = {
    "no-image-sizes": (lambda i: {k: v for k, v in i.items() if k != "image_sizes"}, "needs image_sizes"),
    "image-sizes-for-another-image": (
        lambda i: {**i, "image_sizes": i["image_sizes"].flip(-1)},
        r"need \d+ image placeholder tokens",
    ),
    "too-few-tiles": (lambda i: {**i, "pixel_values": i["pixel_values"][:, :2]}, "tiles per image"),
    "one-image-size-missing": (lambda i: {**i, "image_sizes": i["image_sizes"][:1]}, "image_sizes describes 1"),
}


@pytest.mark.parametrize("scenario", list(ANYRES_BAD))
@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_bad_anyres_inputs_raise_clearly(family: str, scenario: str) -> None:
    model, prompt = _model_and_prompt(family, n_images=2 if scenario == "one-image-size-missing" else 1)
    change, match = ANYRES_BAD[scenario]
    inputs = change(prompt.inputs())
    if family == "llava_onevision" and scenario == "one-image-size-missing":
        match = "batch_num_images"
    pixel_level = scenario != "image-sizes-for-another-image"
    _assert_refused_up_front(model, inputs, match, before_vision_in_generate=pixel_level)


def test_bad_onevision_video_inputs_raise_clearly() -> None:
    model = build_vlm("llava_onevision", "sdpa", seed=9)
    prompt = make_prompt("llava_onevision", model, 1, seed=3, video_frames=2)
    _valid_inputs[id(model)] = prompt.inputs()
    inputs = prompt.inputs()
    inputs["input_ids"] = _replace_one(prompt.input_ids, VIDEO, 7)
    _assert_refused_up_front(model, inputs, r"need \d+ video placeholder tokens")
    inputs = prompt.inputs()
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"][:, :1]  # one frame fewer
    _assert_refused_up_front(model, inputs, r"need \d+ video placeholder tokens \(id 251\), but they contain")
    inputs = prompt.inputs()
    del inputs["pixel_values_videos"]
    _assert_refused_up_front(model, inputs, "no pixel_values_videos")
    inputs = prompt.inputs()
    inputs["input_ids"] = prompt.input_ids.masked_fill(prompt.input_ids == VIDEO, 7)
    _assert_refused_up_front(model, inputs, "contain no video placeholder token")


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_unknown_vision_tower_leaves_the_count_to_the_model(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain forward whose count the adapter cannot compute: the model's own error propagates.

    (Under generate the count is read from the image features generate computed, whatever the tower.)
    """
    import kvpress_mm.adapters.llava as llava_adapter
    from kvpress_mm.errors import InvalidInputError

    monkeypatch.setattr(llava_adapter, "VISION_TOWER_CLS_TOKENS", {})
    model, prompt = _model_and_prompt(family)
    before, hooks = model_snapshot(model), hook_count(model)
    with Compressor.from_name("snapkv", compression_ratio=0.5)(model):
        with pytest.raises(ValueError, match="Image features and image tokens do not match"), torch.no_grad():
            model(**_drop_one_placeholder(prompt))
        with pytest.raises(InvalidInputError, match="mm_encoder_outputs"):
            generate_vlm(model, _drop_one_placeholder(prompt), max_new_tokens=2)
        out = generate_vlm(model, prompt.inputs(), max_new_tokens=2)
    assert cache_of(out).layers[0].keys.shape[-2] == _n_keep(prompt.length, 0.5) + 1
    assert hook_count(model) == hooks
    assert_same_model_state(before, model_snapshot(model))


# -- the adapters' placeholder counts agree with the models' own packing --------------------------

ODD_SIZES = [(56, 28), (28, 56), (30, 50), (60, 60), (20, 45), (10, 300), (300, 10), (57, 113), (113, 57), (28, 28)]


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llava_next", {}),
        ("llava_onevision", {}),
        ("llava_onevision", {"vision_aspect_ratio": "anyres_max_1"}),  # downsampled grids
    ],
)
def test_anyres_counts_match_the_model(family: str, overrides: dict[str, Any]) -> None:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model = build_vlm(family, "sdpa", **overrides)
    adapter: Any = find_adapter(model)
    tiles = [image_size_to_num_patches(s, [[28, 28], [28, 56], [56, 28], [56, 56]], 28) for s in ODD_SIZES]
    inputs: dict[str, Any] = {
        "pixel_values": torch.randn(len(ODD_SIZES), max(tiles), 3, 28, 28),
        "image_sizes": torch.tensor(ODD_SIZES),
    }
    inner: Any = model.model  # type: ignore[union-attr]
    with torch.no_grad():
        features = inner.get_image_features(**inputs, return_dict=True).pooler_output
    expected = [int(f.shape[0]) for f in features]
    assert len(set(expected)) >= 4, "the sizes give different counts"
    assert adapter.image_token_counts(model, inputs) == expected
    assert adapter.image_tiles(model, inputs) == tiles
    if family == "llava_onevision":
        # a multi-image row: no tiles, base + newline each
        inputs["batch_num_images"] = torch.tensor([len(ODD_SIZES)])
        with torch.no_grad():
            features = inner.get_image_features(**inputs, return_dict=True).pooler_output
        assert adapter.image_token_counts(model, inputs) == [int(f.shape[0]) for f in features]
        assert adapter.image_tiles(model, inputs) == [1] * len(ODD_SIZES)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_count_follows_feature_select_strategy(strategy: str) -> None:
    """``full`` keeps CLIP's CLS token: 5 placeholders per 28 px image instead of 4."""
    from kvpress_mm.errors import InvalidInputError

    model = build_vlm("llava", "sdpa", vision_feature_select_strategy=strategy)
    prompt = make_prompt("llava", model, 2, seed=1)
    per_image = 5 if strategy == "full" else 4
    assert prompt.image_counts == [per_image, per_image]
    with Compressor.from_name("snapkv", compression_ratio=0.5, window_size=2)(model):
        out = generate_vlm(model, prompt.inputs(), max_new_tokens=2)
        assert cache_of(out).layers[0].keys.shape[-2] == _n_keep(prompt.length, 0.5) + 1
        with pytest.raises(InvalidInputError, match=f"2 image\\(s\\) of {per_image} tokens each"):
            model(**_drop_one_placeholder(prompt))  # counted from pixel_values
        with pytest.raises(InvalidInputError, match=f"need {2 * per_image} image placeholder tokens"):
            generate_vlm(model, _drop_one_placeholder(prompt), max_new_tokens=2)  # from the features
