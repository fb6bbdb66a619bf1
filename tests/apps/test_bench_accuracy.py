"""``kvpress-mm bench accuracy``: answers on a compressed cache, per task kind x strategy x ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpress_mm.apps.bench.accuracy import (
    AccuracyResult,
    format_table,
    plot,
    render_markdown,
    run_accuracy_benchmark,
)
from kvpress_mm.apps.reference import encode_prompts, heldout_prompts, load_reference_model
from kvpress_mm.apps.reference.evaluate import accuracy_by_kind, predict
from kvpress_mm.apps.reference.questions import answer_batch, answer_logits, split_prompt
from kvpress_mm.apps.reference.tasks import TASK_KINDS
from kvpress_mm.compressor import Compressor
from tests.helpers.cli_fixtures import run_cli

# commands set torch's thread count for their process: every test gives the test process its own back
pytestmark = pytest.mark.usefixtures("restore_torch_threads")


@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return load_reference_model(reference_checkpoint)[0]


def _full_logits(model, prompts) -> torch.Tensor:
    """Next-token logits after each whole prompt in one forward, positions from the mask (the reference)."""
    inputs = encode_prompts(prompts)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**inputs, position_ids=positions).logits[:, -1]


# -- the split prompt on a compressed cache ------------------------------------------------


def test_split_prompt_modes():
    prompt = heldout_prompts(2, 1)[0]
    head, tail = split_prompt(prompt, "question")
    assert head == list(prompt.context.words) and tail == list(prompt.question.words)
    head, tail = split_prompt(prompt, "last-token")
    assert head + tail == list(prompt.words) and len(tail) == 1
    with pytest.raises(ValueError, match="unknown mode 'all'"):
        split_prompt(prompt, "all")


@pytest.mark.parametrize("mode", ["question", "last-token"])
@pytest.mark.parametrize("kind", TASK_KINDS)
def test_the_full_cache_split_in_two_equals_one_forward(model, mode, kind):
    """Head then tail on the cache gives the logits of the whole prompt at once, rows of different lengths too."""
    prompts = [p for p in heldout_prompts(8, 6) if p.kind == kind]
    lengths = {len(p.words) for p in prompts}
    assert len(lengths) > 1  # left padding differs between rows: positions must follow each row
    logits, kept = answer_logits(model, Compressor.from_name("full"), prompts, mode)
    assert kept == 1.0
    torch.testing.assert_close(logits, _full_logits(model, prompts), atol=1e-4, rtol=1e-4)


def test_ratio_zero_changes_nothing_and_batching_changes_nothing(model):
    prompts = [p for p in heldout_prompts(8, 6) if p.kind == "lookup"]
    reference = _full_logits(model, prompts)
    for name in ("snapkv", "lookm-pivotal"):
        logits, kept = answer_logits(model, Compressor.from_name(name, compression_ratio=0.0), prompts)
        assert kept == 1.0
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    for name in ("snapkv", "h2o", "streaming"):
        compressor = Compressor.from_name(name, compression_ratio=0.8)
        batched, _ = answer_logits(model, compressor, prompts, "last-token")
        alone = torch.cat([answer_logits(model, compressor, [p], "last-token")[0] for p in prompts])
        torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)  # each row gets what it would alone


def test_compression_keeps_its_budget_and_changes_the_answers_logits(model):
    prompts = [p for p in heldout_prompts(8, 4) if p.kind == "count"]
    heads = [len(split_prompt(p, "question")[0]) + 1 + 3 * len(p.images) for p in prompts]  # <bos>, 4 tokens/image
    logits, kept = answer_logits(model, Compressor.from_name("streaming", compression_ratio=0.9), prompts)
    assert kept == pytest.approx(sum(int(n * (1 - 0.9)) for n in heads) / sum(heads))  # int(L * (1 - r)) per row
    assert not torch.allclose(logits, _full_logits(model, prompts), atol=1e-3)
    tokens, kept_again = answer_batch(model, Compressor.from_name("streaming", compression_ratio=0.9), prompts)
    assert tokens == logits.argmax(-1).tolist() and kept_again == kept
    with pytest.raises(ValueError, match="one task kind"):
        answer_logits(model, Compressor.from_name("full"), heldout_prompts(2, 1))  # needle has a shorter tail


# -- the benchmark -------------------------------------------------------------------------


def test_full_accuracy_equals_the_full_cache_evaluation(model):
    prompts = heldout_prompts(8, 8)
    result = run_accuracy_benchmark(
        strategies=["full"], n_images=[8], contexts=8, model=model, batch_size=5, progress=False
    )
    expected = accuracy_by_kind(model, prompts)
    assert {c.kind: c.accuracy for c in result.cells} == expected
    assert all(c.total == 8 and c.kept_fraction == 1.0 for c in result.cells)
    predicted = predict(model, prompts)
    for mode in ("question", "last-token"):
        full = Compressor.from_name("full")
        for kind in TASK_KINDS:
            group = [(p, t) for p, t in zip(prompts, predicted) if p.kind == kind]
            tokens, _ = answer_batch(model, full, [p for p, _ in group], mode)
            assert tokens == [t for _, t in group]


def test_the_benchmark_runs_strategies_by_ratios_and_writes_table_json_png(model, tmp_path):
    seen = []
    result = run_accuracy_benchmark(
        strategies=["full", "snapkv", "streaming"],
        ratios=[0.5, 0.9],
        n_images=[2, 4],
        contexts=2,
        model=model,
        progress=False,
        on_cell=seen.append,
    )
    assert seen == result.cells
    assert result.arms() == [("full", 0.0), ("snapkv", 0.5), ("snapkv", 0.9), ("streaming", 0.5), ("streaming", 0.9)]
    assert len(result.cells) == 5 * 2 * len(TASK_KINDS) and all(c.total == 2 for c in result.cells)
    kept = {(c.strategy, c.compression_ratio): c.kept_fraction for c in result.cells if c.n_images == 4}
    assert kept[("full", 0.0)] == 1.0 and 0.45 < kept[("snapkv", 0.5)] <= 0.5 and kept[("streaming", 0.9)] < 0.1
    assert result.settings["strategies"][1]["window_size"] == 8  # the benchmark's short-prompt default
    table = format_table(result)
    assert table.splitlines()[0] == "| strategy | ratio | lookup | retrieve | count | needle | mean |"
    assert len(table.splitlines()) == 2 + 5
    markdown = render_markdown(result)
    assert "2 images:" in markdown and "4 images:" in markdown
    data = json.loads(json.dumps(result.to_json()))
    assert len(data["cells"]) == len(result.cells) and {"accuracy", "correct", "total"} <= set(data["cells"][0])
    png = plot(result, tmp_path / "accuracy.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert AccuracyResult().accuracy("full", 0.0, "lookup") != AccuracyResult().accuracy("full", 0.0, "lookup")  # nan


def test_the_benchmark_loads_a_checkpoint_directory(reference_checkpoint):
    result = run_accuracy_benchmark(
        strategies=["full"], n_images=[1], contexts=1, checkpoint=reference_checkpoint, progress=False
    )
    assert result.settings["model"] == str(reference_checkpoint) and len(result.cells) == len(TASK_KINDS)


# -- the command ---------------------------------------------------------------------------


def test_bench_accuracy_command_writes_files_and_prints_the_table(capsys, tmp_path, reference_checkpoint):
    code, out, err = run_cli(
        capsys, "bench", "accuracy", "--model", reference_checkpoint, "--strategies", "snapkv,h2o", "--ratios", "0.8",
        "--images", "2", "--contexts", "2", "--output", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    assert "accuracy" in err  # the progress bar, on stderr
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| strategy"))
    assert [line.split("|")[1].strip() for line in lines[header + 2 : header + 5]] == ["full", "snapkv", "h2o"]
    assert f"wrote {tmp_path / 'accuracy.json'}" in out
    data = json.loads((tmp_path / "accuracy.json").read_text())
    assert data["settings"]["model"] == str(reference_checkpoint) and data["settings"]["n_images"] == [2]
    assert {(c["strategy"], c["compression_ratio"]) for c in data["cells"]} == {
        ("full", 0.0), ("snapkv", 0.8), ("h2o", 0.8)
    }  # fmt: skip
    assert (tmp_path / "accuracy.md").read_text().startswith("Accuracy on held-out prompts (2 per task kind")
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_accuracy_json_quiet_and_strategy_settings(capsys, tmp_path, reference_checkpoint):
    code, out, err = run_cli(
        capsys, "bench", "accuracy", "--model", reference_checkpoint, "--strategies", "snapkv", "--ratios", "0.5",
        "--images", "1", "--contexts", "1", "--set", "snapkv.window_size=4", "--mode", "last-token",
        "--output", tmp_path, "--no-plot", "--quiet", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert err == ""  # --quiet: no progress bar
    data = json.loads(out)
    assert data["settings"]["mode"] == "last-token"
    assert [s["window_size"] for s in data["settings"]["strategies"] if s["strategy"] == "snapkv"] == [4]
    assert not (tmp_path / "accuracy.png").exists() and (tmp_path / "accuracy.json").exists()


def test_bench_accuracy_runs_wrapper_specs(capsys, tmp_path, reference_checkpoint):
    code, out, err = run_cli(
        capsys, "bench", "accuracy", "--model", reference_checkpoint,
        "--strategies", "pyramid:snapkv,mixkv:pyramid:h2o", "--ratios", "0.8", "--images", "2", "--contexts", "1",
        "--set", "pyramid:snapkv.beta=4",
        "--output", tmp_path, "--no-plot", "--quiet", "--json",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert {c["strategy"] for c in data["cells"]} == {"full", "pyramid:snapkv", "mixkv:pyramid:h2o"}
    configs = {s["strategy"]: s for s in data["settings"]["strategies"]}
    assert configs["pyramid"]["beta"] == 4 and configs["pyramid"]["inner"]["strategy"] == "snapkv"
    assert configs["pyramid"]["inner"]["window_size"] == 8, "the benchmark's snapkv default reaches an inner snapkv"
    assert configs["mixkv"]["inner"]["inner"]["strategy"] == "h2o"
    assert configs["mixkv"]["inner"]["compression_ratio"] == 0.8


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--strategies", "snapkvv"], "unknown strategy 'snapkvv'"),
        (["--ratios", "0.5,1.5"], "the compression ratio must be in [0, 1)"),
        (["--images", "17"], "image counts in 1..16"),
        (["--contexts", "0"], "expected a number of at least 1"),
        (["--set", "snapkv"], "expected STRATEGY.FIELD=VALUE"),
        (["--set", "h2o.window_size=4", "--strategies", "snapkv"], "--set names strategy 'h2o'"),
        (["--set", "snapkv.window_size=-1", "--strategies", "snapkv"], "window_size"),
        (["--strategies", "pyramid:"], "has an empty name"),
        (["--strategies", "pyramid:snapkvv"], "unknown strategy 'snapkvv'"),
        (["--strategies", "pyramid:pyramid:snapkv"], "pyramid(pyramid(...)) is meaningless"),
        (["--strategies", "mixkv:full"], "needs an inner strategy that scores entries"),
        (["--set", "pyramid:h2o.beta=0.5", "--strategies", "pyramid:h2o"], "beta"),
        (["--model", "{tmp}/none"], "does not exist"),
        (["--model", "{tmp}"], "holds no config.json"),
    ],
)
def test_bench_accuracy_user_errors_exit_2_with_one_line(capsys, tmp_path, argv, expected):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, out, err = run_cli(capsys, "bench", "accuracy", *argv, "--output", tmp_path / "out", "--quiet")
    assert code == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1 and expected in err, err
    assert err.startswith("kvpress-mm bench accuracy: error: ")


def test_bench_accuracy_without_the_shipped_checkpoint_says_how_to_train_one(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("kvpress_mm.apps.reference.model.CHECKPOINT_DIR", tmp_path / "checkpoint")
    code, out, err = run_cli(capsys, "bench", "accuracy", "--output", tmp_path / "out", "--quiet")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "no reference checkpoint in" in err and "python -m kvpress_mm.apps.reference.train" in err
    assert "KVPRESS_MM_TRACEBACK" not in err  # an expected error, not a crash


def test_bench_accuracy_help_has_examples(capsys):
    code, out, _ = run_cli(capsys, "bench", "accuracy", "--help")
    assert code == 0
    assert "examples:" in out and "kvpress-mm bench accuracy --strategies snapkv,h2o --ratios 0.8" in out
    for option in ("--strategies", "--ratios", "--images", "--contexts", "--mode", "--set", "--model", "--output",
                   "--json", "--quiet"):  # fmt: skip
        assert option in out


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "kvpress_mm", "bench", "accuracy", "--images", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("kvpress-mm bench accuracy: error: argument --images")


def test_results_name_the_shipped_checkpoint_without_a_machine_path(tmp_path: Path) -> None:
    from kvpress_mm.apps.bench.accuracy import SHIPPED_CHECKPOINT, describe_checkpoint
    from kvpress_mm.apps.reference.model import CHECKPOINT_DIR

    assert describe_checkpoint(None) == describe_checkpoint(CHECKPOINT_DIR) == SHIPPED_CHECKPOINT
    assert not SHIPPED_CHECKPOINT.startswith("/")
    assert describe_checkpoint(tmp_path) == str(tmp_path)  # a user's own checkpoint: as given
