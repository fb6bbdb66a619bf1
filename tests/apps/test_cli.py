"""The ``kvpress-mm`` command line, driven the way a user drives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvpress_mm import list_strategies
from kvpress_mm.registry import DISABLE_AUTOLOAD_ENV, strategy_infos
from kvpress_mm.wrappers import BUILTIN_WRAPPERS
from tests.helpers.cli_fixtures import run_cli, save_tiny_llava

TINY_DEMO = ["demo", "--images", "2", "--new-tokens", "3"]


# commands set torch's thread count for their process: every test gives the test process its own back
pytestmark = pytest.mark.usefixtures("restore_torch_threads")


# -- strategies --------------------------------------------------------------------------


def test_strategies_lists_every_strategy_with_origin_description_and_defaults(capsys):
    code, out, _ = run_cli(capsys, "strategies")
    assert code == 0
    # plugins installed in the environment (CI installs examples/kvpress-mm-keynorm) are listed too
    infos = strategy_infos()
    assert [info.name for info in infos] == list_strategies()
    for info in infos:
        assert f"{info.name}  [{info.origin}]" in out
    builtin = [info.name for info in infos if info.builtin]
    assert len(builtin) == 18  # 12 strategies and 6 wrappers
    for name in builtin:
        package = "wrappers" if name in BUILTIN_WRAPPERS else "strategies"
        assert f"{name}  [built-in (kvpress_mm.{package}." in out
    assert f"({len(builtin)} built-in, {len(infos) - len(builtin)} from plugins)" in out
    assert "Keeps the observation window plus the prefix entries its queries attend to most." in out
    assert "window_size: int = 32" in out  # snapkv
    assert "sink_tokens: int = 4" in out  # streaming
    assert "compression_ratio: float = 0.5" in out
    assert f"{len(list_strategies())} strategies" in out


def test_strategies_json_is_machine_readable(capsys):
    code, out, _ = run_cli(capsys, "strategies", "--json")
    assert code == 0
    records = json.loads(out)
    assert [r["name"] for r in records] == list_strategies()
    by_name = {r["name"]: r for r in records}
    snapkv = by_name["snapkv"]
    assert snapkv["builtin"] is True
    assert snapkv["class"] == "kvpress_mm.strategies.snapkv.SnapKV"
    assert snapkv["config"]["window_size"] == {
        "type": "int",
        "default": 32,
        "required": False,
        "description": "Observation window (queries), always kept.",
    }
    assert snapkv["config"]["pooling"]["default"] == "max"
    assert by_name["h2o"]["config"]["window_size"]["default"] is None
    assert all(r["description"] and r["description"] != "(no description)" for r in records)


def test_strategies_shows_an_installed_plugin(tmp_path: Path):
    """A third-party distribution advertised through the entry-point group appears with its origin.

    Its names are its own (``smallnorm``, not ``keynorm``): the subprocess also discovers the plugins
    installed in the environment, and CI installs examples/kvpress-mm-keynorm, which registers ``keynorm``.
    """
    (tmp_path / "kvpress_smallnorm.py").write_text(
        textwrap.dedent(
            '''
            import torch
            from kvpress_mm import ScoredCompressor, hookimpl

            class KeyNorm(ScoredCompressor):
                """Keep the entries whose keys have the smallest norm."""
                def score(self, layer) -> torch.Tensor:
                    return -layer.keys.float().norm(dim=-1)

            @hookimpl
            def kvpress_mm_register_strategies(register):
                register("smallnorm", KeyNorm)
            '''
        )
    )
    dist_info = tmp_path / "kvpress_smallnorm-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvpress-smallnorm\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[kvpress_mm]\nsmallnorm = kvpress_smallnorm\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop(DISABLE_AUTOLOAD_ENV, None)
    result = subprocess.run(
        [sys.executable, "-m", "kvpress_mm", "strategies", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    records = {r["name"]: r for r in json.loads(result.stdout)}
    plugin = records["smallnorm"]
    assert plugin["builtin"] is False
    assert "plugin 'smallnorm'" in plugin["origin"] and "kvpress-smallnorm 0.1" in plugin["origin"]
    assert plugin["description"] == "Keep the entries whose keys have the smallest norm."
    assert set(plugin["config"]) == {"compression_ratio"}


# -- demo --------------------------------------------------------------------------------

# the reference model: 3 layers x (keys + values) x 4 KV heads x head_dim 24 x 4 bytes (float32) per entry
BYTES_PER_ENTRY = 3 * 2 * 4 * 24 * 4


@pytest.fixture
def demo_argv(reference_checkpoint: Path) -> list[str]:
    """A fast demo on an (untrained) reference checkpoint: 2 images, 3 tokens."""
    return [*TINY_DEMO, "--model", str(reference_checkpoint)]


def test_demo_prints_the_table_and_the_questions(capsys, demo_argv):
    code, out, err = run_cli(capsys, *demo_argv, "--strategies", "snapkv,lookm-pivotal")
    assert code == 0, err
    text = " ".join(out.split())  # paragraphs are wrapped
    assert "reference VLM" in text and "its answers are right or wrong" in text
    assert "prompt: a held-out context of 2 images of 2x2 coloured cells (8 image tokens)" in text  # 4 per image
    assert "questions (the right answer after each arrow): colour " in text
    assert "the full cache continues the context with:" in text
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("strategy  "))
    for column in ("KV before KiB", "KV after KiB", "decode ms/tok", "answers", "top-1", "KL", "greedy"):
        assert column in lines[header]
    rows = [line.split() for line in lines[header + 2 : header + 5]]
    assert [r[0] for r in rows] == ["full", "snapkv", "lookm-pivotal"]  # full first, as the reference
    assert rows[0][3] == "100%" and rows[0][-3:] == ["100%", "0.000", "100%"]
    assert 40 <= int(rows[1][3].rstrip("%")) <= 50 and rows[2][3] == rows[1][3]  # int(L * 0.5) of L entries
    assert all(row[6].endswith("/12") for row in rows)  # 3 questions per task kind
    assert "running snapkv" in err  # progress on stderr, not in the table


def test_demo_quiet_prints_only_the_table_and_a_caveat(capsys, demo_argv):
    code, out, err = run_cli(capsys, *demo_argv, "--strategies", "streaming", "--quiet")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("strategy ") and len(lines) == 5
    assert "kvpress-mm bench accuracy" in lines[-1]
    assert err == ""


def test_demo_json_reports_memory_answers_speed_and_fidelity(capsys, demo_argv):
    code, out, _ = run_cli(capsys, *demo_argv, "--strategies", "h2o,snapkv", "--ratio", "0.5", "--json")
    assert code == 0
    result = json.loads(out)
    assert "reference VLM" in result["note"] and "random_weights" not in result
    assert (result["n_images"], result["image_tokens"], result["new_tokens"]) == (2, 8, 3)
    assert result["compression_ratio"] == 0.5
    questions = result["questions"]
    assert len(questions) == 12 and [q["kind"] for q in questions[::3]] == ["lookup", "retrieve", "count", "needle"]
    length = result["prompt_tokens"]
    rows = {row["strategy"]: row for row in result["rows"]}
    assert list(rows) == ["full", "h2o", "snapkv"]
    prompt_bytes = BYTES_PER_ENTRY * length
    assert all(row["kv_bytes_before"] == prompt_bytes for row in rows.values())
    full = rows["full"]
    assert full["kv_bytes_after"] == prompt_bytes
    assert (full["top1_agreement"], full["kl"], full["greedy_agreement"], full["matching_prefix"]) == (1, 0, 1, 3)
    for row in rows.values():
        assert len(row["answers"]) == 12
        assert row["correct"] == sum(a == q["expected"] for a, q in zip(row["answers"], questions))
    for name in ("h2o", "snapkv"):
        row = rows[name]
        assert row["kv_bytes_after"] == BYTES_PER_ENTRY * (length // 2)
        assert row["config"] == {**row["config"], "strategy": name, "compression_ratio": 0.5}
        assert 0.0 <= row["top1_agreement"] <= 1.0 and 0.0 <= row["greedy_agreement"] <= 1.0
        assert row["kl"] >= 0.0 and len(row["tokens"]) == 3
        assert row["tokens"][0] == full["tokens"][0]  # the first token comes from the full prefill
        assert row["decode_ms_per_token"] > 0
    # two decode steps add 2 entries per layer, except under h2o, which evicts back to its budget
    assert rows["snapkv"]["kv_bytes_end"] == BYTES_PER_ENTRY * (length // 2 + 2)
    assert rows["h2o"]["kv_bytes_end"] == BYTES_PER_ENTRY * (length // 2)


def test_demo_at_ratio_zero_changes_nothing(capsys, demo_argv):
    code, out, _ = run_cli(capsys, *demo_argv, "--strategies", "snapkv,lookm-pivotal", "--ratio", "0", "--json")
    assert code == 0
    result = json.loads(out)
    full = result["rows"][0]
    for row in result["rows"]:
        assert row["kv_bytes_after"] == row["kv_bytes_before"]
        assert row["kl"] == 0.0 and row["top1_agreement"] == 1.0 and row["greedy_agreement"] == 1.0
        assert row["answers"] == full["answers"]


def test_demo_seed_picks_another_heldout_context(capsys, demo_argv):
    outputs = []
    for seed in ("0", "1"):
        code, out, _ = run_cli(capsys, *demo_argv, "--strategies", "streaming", "--seed", seed, "--json")
        assert code == 0
        outputs.append(json.loads(out)["questions"])
    assert outputs[0] != outputs[1]


def test_demo_without_the_shipped_checkpoint_says_how_to_train_one(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("kvpress_mm.apps.reference.model.CHECKPOINT_DIR", tmp_path / "checkpoint")
    code, out, err = run_cli(capsys, *TINY_DEMO, "--quiet")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("kvpress-mm demo: error: no reference checkpoint")
    assert "python -m kvpress_mm.apps.reference.train" in err


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("none", "model directory '{tmp}/none' does not exist"),
        ("empty", "'{tmp}/empty' holds no config.json"),
        ("llava", "the demo needs the reference model"),
    ],
)
def test_demo_refuses_a_directory_that_is_not_a_reference_checkpoint(capsys, tmp_path, model, expected):
    save_tiny_llava(tmp_path / "llava")
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, *TINY_DEMO, "--model", str(tmp_path / model), "--quiet")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected.format(tmp=tmp_path) in err, err


# -- errors and help ---------------------------------------------------------------------


def test_unknown_strategy_exits_nonzero_with_one_line_and_suggestions(capsys):
    code, out, err = run_cli(capsys, *TINY_DEMO, "--strategies", "snapk,h2o")
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("kvpress-mm demo: error: unknown strategy 'snapk'")
    assert "Did you mean 'snapkv'?" in err and "lookm-pivotal" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["demo", "--ratio", "1"], "the compression ratio must be in [0, 1)"),
        (["demo", "--ratio", "abc"], "expected a number in [0, 1)"),
        (["demo", "--images", "0"], "expected a number of at least 1"),
        (["demo", "--new-tokens", "1"], "expected at least 2"),
        (["demo", "--strategies", ","], "expected comma-separated names"),
        (["demo", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["run", "--prompt", "hi", "--strategy", "snapkv"], "the following arguments are required: --model"),
        (["run", "--model", "m", "--prompt", "hi", "--strategy", "h2o", "--set", "window"], "expected key=value"),
        (["bench"], "choose a benchmark: accuracy, fidelity"),
        (["demo", "--images", "17"], "expected at most 16 images"),
        (["demo", "--seed", "-1"], "expected a number of at least 0"),
        (["bench", "fidelity", "--ratios", "0.5,2"], "the compression ratio must be in [0, 1)"),
        (["eval"], "choose an evaluation: milebench"),
        (["eval", "milebench", "--model", "m"], "the following arguments are required: --data"),
        (["compress"], "invalid choice: 'compress'"),
        ([], "choose a command"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line(capsys, argv, expected):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err and "--help" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["strategies"],
        ["demo"],
        ["run"],
        ["bench"],
        ["bench", "accuracy"],
        ["bench", "fidelity"],
        ["eval"],
        ["eval", "milebench"],
    ],
)
def test_every_command_has_help_with_examples(capsys, argv):
    code, out, _ = run_cli(capsys, *argv, "--help")
    assert code == 0
    assert "examples:" in out and "kvpress-mm" in out


def test_python_dash_m_runs_the_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "kvpress_mm", "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("kvpress-mm 0.")
