"""``kvpress-mm run``: real generation on local model directories, driven as a user drives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli_fixtures import (
    TINY_BYTES_PER_ENTRY,
    run_cli,
    save_tiny_internvl,
    save_tiny_llava,
    save_tiny_qwen2_vl,
    save_tiny_text_model,
    write_images,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("run")
    a, b = write_images(root / "images")
    return {
        "llava": save_tiny_llava(root / "llava"),
        "text": save_tiny_text_model(root / "text"),
        "a": a,
        "b": b,
        "bad": root / "images" / "bad.png",
        "root": root,
    }


# commands set torch's thread count for their process: every test gives the test process its own back
pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def test_run_prints_the_answer_and_the_memory_saved(capsys, files):
    code, out, err = run_cli(
        capsys, "run", "--model", files["llava"], "--image", files["a"], "--image", files["b"],
        "--prompt", "which photo shows a red circle ?", "--strategy", "lookm-pivotal", "--ratio", "0.8",
        "--set", "window_size=4", "--max-new-tokens", "5",
    )  # fmt: skip
    assert code == 0, err
    answer, _, memory = out.partition("\n\n")
    assert answer.strip()  # random weights: some words
    memory = " ".join(memory.split())
    assert "KV cache of the prompt:" in memory and "saved) under lookm-pivotal (compression_ratio=0.8" in memory
    assert "window_size=4" in memory and "32 of them image tokens, 2 image(s)" in memory
    assert "loading" in err  # progress goes to stderr


def test_run_json_reports_the_cache_and_the_answer(capsys, files):
    code, out, err = run_cli(
        capsys, "run", "--model", files["llava"], "--image", files["a"], "--image", files["b"],
        "--prompt", "photo 1 : <image> photo 2 : <image> which photo is red ?", "--strategy", "snapkv",
        "--ratio", "0.75", "--set", "window_size=8", "--set", "pooling=avg", "--max-new-tokens", "4", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert err == ""  # --json: no progress messages
    result = json.loads(out)
    length = result["prompt_tokens"]
    assert (result["images"], result["image_tokens"], result["new_tokens"]) == (2, 32, 4)
    assert result["strategy"] == {
        "strategy": "snapkv", "compression_ratio": 0.75, "window_size": 8, "kernel_size": 7, "pooling": "avg",
    }  # fmt: skip
    assert result["n_keep"] == [int(length * 0.25)]
    assert result["kv_bytes_before"] == TINY_BYTES_PER_ENTRY * length
    assert result["kv_bytes_after"] == TINY_BYTES_PER_ENTRY * result["n_keep"][0]
    assert result["saved_fraction"] == pytest.approx(1 - result["kv_bytes_after"] / result["kv_bytes_before"])
    assert len(result["tokens"]) == 4 and isinstance(result["answer"], str)


def test_run_quiet_prints_only_the_answer(capsys, files):
    code, out, err = run_cli(
        capsys, "run", "--model", files["llava"], "--image", files["a"], "--prompt", "what is shown ?",
        "--strategy", "h2o", "--max-new-tokens", "3", "--quiet",
    )  # fmt: skip
    assert code == 0 and err == ""
    assert len(out.strip().splitlines()) == 1


def test_ratio_zero_answers_like_the_full_cache(capsys, files):
    answers = []
    for strategy in (["full"], ["streaming", "--ratio", "0"]):
        code, out, err = run_cli(
            capsys, "run", "--model", files["llava"], "--image", files["a"], "--prompt", "describe the photo",
            "--strategy", *strategy, "--max-new-tokens", "6", "--json",
        )  # fmt: skip
        assert code == 0, err
        answers.append(json.loads(out)["tokens"])
    assert answers[0] == answers[1]


def test_text_only_models_work_without_images(capsys, files):
    code, out, err = run_cli(
        capsys, "run", "--model", files["text"], "--prompt", "key 3 is red . key 5 is blue . what colour is key 3 ?",
        "--strategy", "streaming", "--ratio", "0.5", "--set", "sink_tokens=2", "--max-new-tokens", "3", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 0 and result["image_tokens"] == 0
    assert result["kv_bytes_after"] < result["kv_bytes_before"]


@pytest.mark.parametrize(
    ("family", "save", "tokens_per_image"),
    [
        # a.png (64 px) fits max_pixels: 56 x 56 -> grid 1 x 4 x 4 -> 4 tokens after the 2 x 2 merge; b.png too
        ("qwen2_vl", save_tiny_qwen2_vl, [4, 4]),
        # GotOcr2 tiles: 1 tile per 56 px image (no thumbnail when a single tile) x image_seq_length 4
        ("internvl", save_tiny_internvl, [4, 4]),
    ],
)
def test_qwen_vl_and_internvl_run_without_their_torchvision_processors(capsys, files, family, save, tokens_per_image):
    """Their transformers Processors need torchvision; the commands use the PIL image processor and expand by hand."""
    model = save(files["root"] / family)
    code, out, err = run_cli(
        capsys, "run", "--model", model, "--image", files["a"], "--image", files["b"],
        "--prompt", "which photo is red ?", "--strategy", "lookm-pivotal", "--ratio", "0.5", "--max-new-tokens", "3",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 2 and result["image_tokens"] == sum(tokens_per_image)
    assert result["n_keep"] == [result["prompt_tokens"] // 2]
    assert 0.4 < result["saved_fraction"] <= 0.5


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing model", "model directory '{root}/nope' does not exist"),
        ("not a model", "holds no config.json: not a model directory"),
        ("unreadable image", "cannot read image '{root}/images/bad.png'"),
        ("missing image", "image '{root}/images/none.png' does not exist"),
        ("unknown strategy", "unknown strategy 'lookm-pivot'. Did you mean 'lookm-pivotal'"),
        ("invalid option", "invalid SnapKV config: window_size: Input should be greater than or equal to 1"),
        ("unknown option", "invalid SnapKV config: windows: Extra inputs are not permitted"),
        ("ratio twice", "the compression ratio is given twice"),
        ("markers", "the prompt has 2 image marker(s) '<image>' but 1 image(s) were given"),
        ("image for text model", "is text-only (llama) but 1 image(s) were given"),
    ],
)
def test_user_errors_exit_2_with_one_clear_line(capsys, files, case, expected):
    root = files["root"]
    model, images, prompt, strategy = files["llava"], [files["a"]], "hi", ["--strategy", "snapkv"]
    if case == "missing model":
        model = root / "nope"
    elif case == "not a model":
        model = root / "images"
    elif case == "unreadable image":
        images = [files["bad"]]
    elif case == "missing image":
        images = [root / "images" / "none.png"]
    elif case == "unknown strategy":
        strategy = ["--strategy", "lookm-pivot"]
    elif case == "invalid option":
        strategy += ["--set", "window_size=0"]
    elif case == "unknown option":
        strategy += ["--set", "windows=8"]
    elif case == "ratio twice":
        strategy += ["--ratio", "0.5", "--set", "compression_ratio=0.6"]
    elif case == "markers":
        prompt = "<image> and <image>"
    elif case == "image for text model":
        model = files["text"]
    argv = ["run", "--model", model, "--prompt", prompt, *strategy, "--max-new-tokens", "2"]
    for image in images:
        argv += ["--image", image]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvpress-mm run: error: ")
    assert expected.format(root=root) in lines[0]


def test_the_console_script_runs_end_to_end(files):
    """As a user runs it: the installed `kvpress-mm` in a fresh process, then a user error without traceback."""
    script = Path(sys.executable).with_name("kvpress-mm")
    command = [str(script) if script.exists() else sys.executable, *([] if script.exists() else ["-m", "kvpress_mm"])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(
        [*command, "run", "--model", str(files["llava"]), "--image", str(files["a"]), "--prompt", "what is it ?",
         "--strategy", "lookm-evict", "--ratio", "0.5", "--max-new-tokens", "3", "--threads", "1", "--quiet"],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.strip().splitlines()) == 1 and ok.stderr == ""
