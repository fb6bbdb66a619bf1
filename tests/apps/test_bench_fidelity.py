"""``kvpress-mm bench fidelity`` and its metrics: agreement and KL against the full cache."""

from __future__ import annotations

import json

import pytest
import torch

from kvpress_mm.apps.bench.fidelity import load_prompts, reference_prompts, run_fidelity, summarize
from kvpress_mm.apps.bench.metrics import fidelity, greedy_agreement, kl_per_step
from kvpress_mm.apps.embedded_model import build
from kvpress_mm.apps.models import LoadedModel
from kvpress_mm.apps.prompts import gallery_prompt
from kvpress_mm.apps.reference.tasks import HELDOUT_SEED, heldout_prompts
from kvpress_mm.errors import UsageError
from tests.helpers.cli_fixtures import TINY, TINY_BYTES_PER_ENTRY, run_cli, save_tiny_llava, write_images

# commands set torch's thread count for their process: every test gives the test process its own back
pytestmark = pytest.mark.usefixtures("restore_torch_threads")


# -- metrics -------------------------------------------------------------------------------


def test_kl_is_zero_for_identical_distributions_and_matches_the_definition():
    logits = torch.randn(5, 11)
    assert torch.allclose(kl_per_step(logits, logits), torch.zeros(5, dtype=torch.float64))
    other = torch.randn(5, 11)
    p, q = logits.double().softmax(-1), other.double().softmax(-1)
    assert torch.allclose(kl_per_step(logits, other), (p * (p / q).log()).sum(-1))
    assert bool((kl_per_step(logits, other) > 0).all())


def test_metrics_skip_the_first_token_which_comes_from_the_prefill():
    reference = [5, 1, 2, 3]
    logits = torch.full((4, 8), -10.0)
    logits[torch.arange(4), torch.tensor(reference)] = 10.0
    forced = logits.clone()
    forced[2] = forced[2].flip(0)  # step 2 now prefers token 5 over token 2
    result = fidelity(reference, logits, forced, free_tokens=[5, 1, 7, 3])
    assert result.top1_agreement == pytest.approx(2 / 3)  # steps 1..3: steps 1 and 3 agree
    assert result.kl > 0
    assert result.greedy_agreement == pytest.approx(2 / 3) and result.matching_prefix == 2
    assert greedy_agreement([1, 2, 3], [1, 2]) == (0.5, 2)  # a shorter continuation misses the rest


# -- the benchmark on a tiny model ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_loaded() -> LoadedModel:
    model, processor = build(TINY)
    return LoadedModel(model, processor.tokenizer, processor, TINY.describe(), "embedded", random_weights=True)


def test_ratio_zero_is_exactly_the_full_cache_and_compression_shrinks_the_cache(tiny_loaded):
    prompt = gallery_prompt(n_images=2, seed=3)
    result = run_fidelity(tiny_loaded, [prompt], ["snapkv", "streaming", "full"], [0.0, 0.75], new_tokens=4)
    assert result.strategies == ["snapkv", "streaming"]  # full is the reference, not a row
    length = result.references[0].prompt_tokens
    assert result.references[0].kv_bytes == TINY_BYTES_PER_ENTRY * length
    records = {(r.strategy, r.compression_ratio): r for r in result.records}
    for name in ("snapkv", "streaming"):
        exact = records[(name, 0.0)]
        assert (exact.top1_agreement, exact.kl, exact.greedy_agreement, exact.matching_prefix) == (1.0, 0.0, 1.0, 4)
        assert exact.kv_bytes_after == exact.kv_bytes_before == TINY_BYTES_PER_ENTRY * length
        compressed = records[(name, 0.75)]
        assert compressed.kv_bytes_after == TINY_BYTES_PER_ENTRY * int(length * 0.25)
        assert compressed.kl >= 0 and 0 <= compressed.top1_agreement <= 1
        assert compressed.decode_ms_per_token > 0
    summary = {(s.strategy, s.compression_ratio): s for s in summarize(result.records)}
    assert summary[("snapkv", 0.75)].prompts == 1 and summary[("snapkv", 0.75)].kept_fraction < 0.3


# -- prompt files --------------------------------------------------------------------------


def test_prompt_files_jsonl_with_images_json_and_text(tmp_path):
    a, b = write_images(tmp_path)
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(
        json.dumps({"prompt": "photo 1 : <image> photo 2 : <image> which is red ?", "images": ["a.png", "b.png"]})
        + "\n"
        + json.dumps({"prompt": "describe it", "images": ["a.png"], "name": "first-image"})
        + "\n\n"
    )
    prompts = load_prompts(jsonl)
    assert [p.name for p in prompts] == ["prompt-1", "first-image"]
    assert [len(p.images) for p in prompts] == [2, 1]
    assert prompts[0].text_with("<I>") == "photo 1 : <I> photo 2 : <I> which is red ?"
    assert prompts[1].text_with("<I>") == "<I>\ndescribe it"  # no marker: images first
    listing = tmp_path / "prompts.json"
    listing.write_text(json.dumps([{"prompt": "one"}, {"prompt": "two"}]))
    assert [p.text_with("") for p in load_prompts(listing)] == ["one", "two"]
    text = tmp_path / "prompts.txt"
    text.write_text("first prompt\n\nsecond prompt\n")
    assert [p.text_with("") for p in load_prompts(text)] == ["first prompt", "second prompt"]


@pytest.mark.parametrize(
    ("content", "name", "expected"),
    [
        (None, "none.jsonl", "prompt file '{dir}/none.jsonl' does not exist"),
        ("{not json", "bad.jsonl", "is not valid JSONL"),
        ('{"text": "x"}', "bad.jsonl", "entry 1: expected an object with a 'prompt' string"),
        ('{"prompt": "x", "images": ["missing.png"]}', "bad.jsonl", "image '{dir}/missing.png' does not exist"),
        ('{"prompt": "<image> <image>", "images": ["a.png"]}', "bad.jsonl", "2 image marker(s)"),
        ("", "empty.txt", "has no prompts"),
    ],
)
def test_bad_prompt_files_raise_one_clear_error(tmp_path, content, name, expected):
    write_images(tmp_path)
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(UsageError) as error:
        load_prompts(tmp_path / name)
    assert expected.format(dir=tmp_path) in str(error.value)


# -- the command ---------------------------------------------------------------------------


def test_bench_fidelity_writes_json_and_png_and_prints_a_table(capsys, tmp_path, monkeypatch, reference_checkpoint):
    # the default model is the shipped reference VLM: here an untrained one in its place
    monkeypatch.setattr("kvpress_mm.apps.reference.model.CHECKPOINT_DIR", reference_checkpoint)
    code, out, err = run_cli(
        capsys, "bench", "fidelity", "--strategies", "snapkv,h2o", "--ratios", "0.5,0.9", "--num-prompts", "2",
        "--new-tokens", "3", "--output", tmp_path, "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    assert "fidelity" in err  # the progress bar, on stderr
    text = " ".join(out.split())
    assert "NOTE: the reference VLM on held-out task prompts" in text and "RANDOM-WEIGHT" not in text
    assert f"model: the reference VLM from {reference_checkpoint}" in text
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("strategy "))
    for column in ("ratio", "kept", "top-1", "KL", "greedy", "KV after KiB", "decode ms/tok"):
        assert column in lines[header]
    rows = [line.split() for line in lines[header + 2 : header + 7]]
    assert [(r[0], r[1]) for r in rows] == [("full", "0"), ("h2o", "0.5"), ("snapkv", "0.5"), ("h2o", "0.9"),
                                             ("snapkv", "0.9")]  # fmt: skip
    data = json.loads((tmp_path / "fidelity.json").read_text())
    assert data["random_weights"] is False and data["new_tokens"] == 3
    assert [r["prompt"] for r in data["references"]] == ["lookup-1", "retrieve-2"]  # held-out task prompts
    assert {(s["strategy"], s["compression_ratio"]) for s in data["summary"]} == {
        ("snapkv", 0.5), ("snapkv", 0.9), ("h2o", 0.5), ("h2o", 0.9)
    }  # fmt: skip
    for row in data["summary"]:
        assert set(row) >= {"top1_agreement", "kl", "greedy_agreement", "kv_bytes_before", "kv_bytes_after",
                            "decode_ms_per_token", "kept_fraction"}  # fmt: skip
        assert row["kept_fraction"] < 0.6
    assert (tmp_path / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_fidelity_on_a_random_model_says_so(capsys, tmp_path):
    model = save_tiny_llava(tmp_path / "llava")
    code, out, err = run_cli(
        capsys, "bench", "fidelity", "--model", model, "--strategies", "streaming", "--ratios", "0.5",
        "--num-prompts", "1", "--new-tokens", "2", "--output", tmp_path / "out", "--no-plot",
    )  # fmt: skip
    assert code == 0, err
    assert "reference VLM" not in out  # another model: the built-in gallery prompts
    data = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert data["references"][0]["prompt"] != "lookup-1"


def test_reference_prompts_are_heldout_task_prompts_with_pil_images():
    prompts = reference_prompts(count=5, seed=0)
    assert [p.name for p in prompts] == ["lookup-1", "retrieve-2", "count-3", "needle-4", "lookup-5"]
    assert all(len(p.images) == 8 and p.images[0].size == (28, 28) for p in prompts)
    assert prompts[0].text_with("<image>") == heldout_prompts(8, 1, seed=HELDOUT_SEED)[0].text
    assert reference_prompts(count=1, seed=1)[0].text_with("<image>") != prompts[0].text_with("<image>")


def test_bench_fidelity_without_the_shipped_checkpoint_says_how_to_train_one(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("kvpress_mm.apps.reference.model.CHECKPOINT_DIR", tmp_path / "checkpoint")
    code, out, err = run_cli(capsys, "bench", "fidelity", "--output", tmp_path / "out", "--quiet")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "python -m kvpress_mm.apps.reference.train" in err


def test_bench_fidelity_json_and_quiet_on_a_local_model_with_a_prompt_file(capsys, tmp_path):
    model = save_tiny_llava(tmp_path / "llava")
    write_images(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "<image> what is it ?", "images": ["a.png"], "name": "one"}) + "\n")
    code, out, err = run_cli(
        capsys, "bench", "fidelity", "--model", model, "--prompts", prompts, "--strategies", "lookm-evict",
        "--ratios", "0.5", "--new-tokens", "3", "--output", tmp_path / "out", "--no-plot", "--quiet", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert err == ""  # --quiet: no progress bar
    data = json.loads(out)
    assert data["random_weights"] is False and "LlavaForConditionalGeneration" in data["model"]
    assert [r["prompt"] for r in data["references"]] == ["one"]
    assert [(r["strategy"], r["compression_ratio"]) for r in data["records"]] == [("lookm-evict", 0.5)]
    assert not (tmp_path / "out" / "fidelity.png").exists() and (tmp_path / "out" / "fidelity.json").exists()


def test_bench_fidelity_user_errors_are_one_line(capsys, tmp_path):
    for argv, expected in [
        (["--strategies", "snapkvv"], "unknown strategy 'snapkvv'"),
        (["--model", tmp_path / "none"], "does not exist"),
        (["--prompts", tmp_path / "none.jsonl"], "prompt file"),
    ]:
        code, out, err = run_cli(capsys, "bench", "fidelity", *argv, "--output", tmp_path)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and expected in err, err
