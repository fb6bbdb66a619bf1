"""MileBench: its data format, prompt construction, scoring, and the resumable, sharded runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvpress_mm.apps.eval.milebench_runner as runner
from kvpress_mm.apps.eval.milebench import IMAGE_PLACEHOLDER, build_prompt, dataset_group, load_dataset
from kvpress_mm.apps.eval.milebench_scoring import match_choice, normalize, score_dataset, score_sample
from kvpress_mm.apps.eval.rouge import rouge_l
from kvpress_mm.errors import UsageError
from tests.helpers.cli_fixtures import run_cli, save_tiny_llava, save_tiny_text_model
from tests.helpers.milebench_fixture import DATASETS, write_milebench

N_SAMPLES = sum(count for _, count in DATASETS.values())


# commands set torch's thread count for their process: every test gives the test process its own back
pytestmark = pytest.mark.usefixtures("restore_torch_threads")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_milebench(tmp_path_factory.mktemp("milebench"))


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("models") / "llava")


def eval_args(data: Path, model: Path, output: Path, *extra: object) -> list[object]:
    return ["eval", "milebench", "--data", data, "--model", model, "--strategy", "snapkv", "--ratio", "0.5",
            "--output", output, "--max-new-tokens", "3", "--threads", "1", *extra]  # fmt: skip


def prediction_lines(output: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((output / "predictions").glob("*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]  # fmt: skip


# -- the data format and the prompts -------------------------------------------------------


def test_datasets_load_and_map_to_milebench_groups(data):
    dataset = load_dataset(data, "ActionSequence")
    assert dataset.question_type == "multi-choice" and len(dataset.samples) == 5
    sample = dataset.samples[1]
    assert sample.images == ["1_1.png", "1_2.png"] and sample.choice_list and sample.key == "1"
    assert dataset.group == "Realistic Temporal"
    assert dataset_group("action_sequence") == "Realistic Temporal"  # score.py's spelling
    assert dataset_group("TQA") == "Realistic Semantic"
    assert dataset_group("ImageNeedleInAHaystack") == "Diagnostic: Needle in a Haystack"
    assert dataset_group("GPR1200") == "Diagnostic: Image Retrieval"
    assert dataset_group("MyOwnSet") == "Other"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.pop("meta_data"), "missing field 'meta_data'"),
        (lambda d: d["data"][0].pop("task_instance"), "data[0]: missing field 'task_instance'"),
        (lambda d: d["data"][0].update(task_instruction_id=7), "task_instruction_id 7 is not in"),
        (lambda d: d["data"][0]["task_instance"].pop("images_path"), "missing field 'images_path'"),
    ],
)
def test_malformed_datasets_are_one_clear_error(tmp_path, mutate, expected):
    root = write_milebench(tmp_path, {"TQA": ("open-ended", 1)})
    path = root / "TQA" / "TQA.json"
    document = json.loads(path.read_text())
    mutate(document)
    path.write_text(json.dumps(document))
    with pytest.raises(UsageError, match="TQA") as error:
        load_dataset(root, "TQA")
    assert expected in str(error.value)


def words(text: str) -> list[str]:
    return text.split()


def test_prompts_are_built_like_milebench(data):
    dataset = load_dataset(data, "ActionSequence")
    sample = dataset.samples[2]  # 3 images
    built = build_prompt(dataset, sample, words, " ".join, max_context_len=1000, tokens_per_image=10)
    instruction = dataset.task_instructions[sample.task_instruction_id]
    assert built.text.startswith(instruction + "\n")  # the instruction first
    assert built.text.count(IMAGE_PLACEHOLDER) == 3 and "{image#" not in built.text
    assert built.text.endswith("\nChoice list: \nA. square\nB. circle\nC. triangle\nD. cross\nYour answer is: ")
    assert [p.name for p in built.image_paths] == ["2_1.png", "2_2.png", "2_3.png"]
    assert built.image_paths[0].parent == data / "ActionSequence" / "images"
    assert not built.truncated


def test_long_contexts_lose_their_beginning_and_keep_the_question(data):
    dataset = load_dataset(data, "ActionSequence")
    sample = dataset.samples[2]  # "photo 1 : {image#1} . photo 2 : {image#2} . photo 3 : {image#3} . question ..."
    full = build_prompt(dataset, sample, words, " ".join, max_context_len=1000, tokens_per_image=10)
    instruction_words = len(words(dataset.task_instructions[sample.task_instruction_id]))
    tail = full.text.split(IMAGE_PLACEHOLDER)[-1]  # ". question : ... Your answer is: "
    # room for the question, one image and the text before it, not for the second image
    budget = instruction_words + len(words(tail)) + 10 + len(words(" . photo 3 : "))
    built = build_prompt(dataset, sample, words, " ".join, max_context_len=budget, tokens_per_image=10)
    assert built.truncated
    assert [p.name for p in built.image_paths] == ["2_3.png"]  # the earliest images go first
    assert built.text.count(IMAGE_PLACEHOLDER) == 1 and built.text.endswith(tail)
    assert "photo 3 :" in built.text and "photo 1 :" not in built.text and "photo 2 :" not in built.text
    # a question longer than the whole budget keeps its end
    tiny = build_prompt(dataset, sample, words, " ".join, max_context_len=instruction_words + 3, tokens_per_image=10)
    assert tiny.image_paths == [] and tiny.text.split("\n", 1)[1] == "Your answer is:"


# -- scoring -------------------------------------------------------------------------------


def test_normalization_and_option_matching_follow_milebench():
    assert normalize("  The Answer: (B), surely!\n") == "the answer: b  surely"
    options = {"A": "square", "B": "circle", "C": "triangle"}
    assert match_choice("b. circle", options) == "B"  # "letter text"
    assert match_choice("i think it is a triangle", options) == "C"  # the option text
    assert match_choice("a", options) == "A"  # a lone letter
    assert match_choice("", options) == "C"  # MileBench's quirk: an empty answer is C


def test_each_dataset_kind_is_scored_as_milebench_scores_it(data):
    choice = load_dataset(data, "ActionSequence")
    sample = choice.samples[0]  # answer "square" = option A
    assert score_sample(choice, sample, "A").score == 1.0
    assert score_sample(choice, sample, "A. square").score == 1.0
    assert score_sample(choice, sample, "circle").score == 0.0
    needle = load_dataset(data, "TextNeedleInAHaystack")
    assert score_sample(needle, needle.samples[0], "it is a square .").score == 1.0  # a whole word
    assert score_sample(needle, needle.samples[0], "squares").score == 0.0
    open_ended = load_dataset(data, "TQA")
    assert score_sample(open_ended, open_ended.samples[0], "square").score == pytest.approx(1.0)
    assert score_sample(open_ended, open_ended.samples[0], "").score == 0.0
    result = score_dataset(open_ended, {s.key: s.response for s in open_ended.samples})
    assert (result.metric, result.samples) == ("Rouge-L f", 4) and result.score == pytest.approx(1.0)
    assert result.eval_json()["Rouge-L f"] == pytest.approx(1.0)


def test_rouge_l_matches_the_rouge_package():
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    assert rouge_l("a b c", "a b c") == pytest.approx(1.0, abs=1e-6)
    assert rouge_l("x y", "a b") == 0.0
    # sentences are split at periods and scored with the union LCS over distinct words
    assert rouge_l("a b. c d", "a b c d") == pytest.approx(1.0, abs=1e-6)
    assert rouge_l("...", "a") == 0.0


# -- the runner ----------------------------------------------------------------------------


def test_a_run_writes_milebench_files_and_grouped_results(capsys, data, llava, tmp_path):
    output = tmp_path / "out"
    code, out, err = run_cli(capsys, *eval_args(data, llava, output))
    assert code == 0, err
    assert "[Overall]" in out and "Realistic Temporal" in out
    records = prediction_lines(output)
    assert len(records) == N_SAMPLES and len({(r["dataset"], r["sample_id"]) for r in records}) == N_SAMPLES
    assert all(r["kv_bytes_after"] < r["kv_bytes_before"] for r in records)
    for name in DATASETS:
        predictions = json.loads((output / name / "pred.json").read_text())
        assert [p["sample_id"] for p in predictions] == list(range(DATASETS[name][1]))
        assert set(predictions[0]) >= {"sample_id", "gt_response", "pred_response"}
        assert (output / name / "eval.json").is_file() and (output / name / "eval_score.json").is_file()
    results = json.loads((output / "results.json").read_text())
    assert results["run"]["strategy"]["strategy"] == "snapkv" and results["run"]["tokens_per_image"] == 16
    assert results["datasets"]["TQA"]["metric"] == "Rouge-L f"
    assert results["datasets"]["ActionSequence"]["metric"] == "Accuracy"
    assert results["datasets"]["TextNeedleInAHaystack"]["group"] == "Diagnostic: Needle in a Haystack"
    assert 0.4 < results["datasets"]["TQA"]["kv_kept_fraction"] < 0.6
    assert set(results["groups"]) == {"Realistic Temporal", "Realistic Semantic",
                                      "Diagnostic: Needle in a Haystack", "Diagnostic", "Overall"}  # fmt: skip
    csv = (output / "results.csv").read_text().splitlines()
    assert csv[0] == "kind,name,group,metric,score,samples,kv_kept_fraction"
    assert len(csv) == 1 + len(DATASETS) + 5


def test_merge_scores_what_the_output_holds(capsys, data, tmp_path):
    """Perfect predictions, written by hand in the runner's format, score 100 everywhere."""
    output = tmp_path / "out"
    (output / "predictions").mkdir(parents=True)
    for name in DATASETS:
        dataset = load_dataset(data, name)
        lines = [json.dumps({"sample_id": s.sample_id, "gt_response": s.response, "pred_response": s.response})
                 for s in dataset.samples]  # fmt: skip
        (output / "predictions" / f"{name}.rank0.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(capsys, "eval", "milebench", "--data", data, "--output", output, "--merge", "--json")
    assert code == 0, err
    results = json.loads(out)
    assert all(d["score"] == pytest.approx(1.0) for d in results["datasets"].values())
    assert results["groups"]["Overall"] == pytest.approx(1.0)


def test_a_killed_run_resumes_without_redoing_or_losing_samples(capsys, data, llava, tmp_path, monkeypatch):
    output = tmp_path / "out"
    calls = []
    generate = runner.generate

    def dying_generate(*args, **kwargs):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the run is killed during its fifth sample
        calls.append(1)
        return generate(*args, **kwargs)

    monkeypatch.setattr(runner, "generate", dying_generate)
    code, _, err = run_cli(capsys, *eval_args(data, llava, output))
    assert code == 130 and "interrupted" in err
    assert len(prediction_lines(output)) == 4  # every finished sample is on disk
    assert not (output / "results.json").exists()
    # a crash in the middle of a write leaves a torn line: it is ignored and its sample redone
    first = sorted((output / "predictions").glob("*.jsonl"))[0]
    with first.open("a") as file:
        file.write('{"dataset": "x", "sample_id": 99, "pred_resp')
    calls.clear()
    monkeypatch.setattr(runner, "generate", lambda *a, **k: (calls.append(1), generate(*a, **k))[1])
    code, _, err = run_cli(capsys, *eval_args(data, llava, output))
    assert code == 0, err
    assert len(calls) == N_SAMPLES - 4  # only the unfinished samples
    records = prediction_lines_tolerant(output)
    assert len(records) == N_SAMPLES and len({(r["dataset"], r["sample_id"]) for r in records}) == N_SAMPLES
    assert json.loads((output / "results.json").read_text())["datasets"].keys() == DATASETS.keys()


def prediction_lines_tolerant(output: Path) -> list[dict]:
    records = []
    for path in sorted((output / "predictions").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def test_processes_share_the_samples_and_process_0_merges(capsys, data, llava, tmp_path, monkeypatch):
    output = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, out, err = run_cli(capsys, *eval_args(data, llava, output))
    assert code == 0 and out == "", err  # process 1 does its shard and leaves the merge to process 0
    assert not (output / "results.json").exists()
    monkeypatch.setenv("RANK", "0")
    code, out, err = run_cli(capsys, *eval_args(data, llava, output, "--merge-timeout", "30", "--json"))
    assert code == 0, err
    assert json.loads(out)["groups"]["Overall"] >= 0
    for name, (_, count) in DATASETS.items():
        by_rank = {rank: [json.loads(line)["sample_id"] for line in
                          (output / "predictions" / f"{name}.rank{rank}.jsonl").read_text().splitlines()]
                   for rank in (0, 1)}  # fmt: skip
        assert by_rank[0] == list(range(0, count, 2)) and by_rank[1] == list(range(1, count, 2))


def test_restarting_with_other_settings_or_merging_too_early_is_refused(capsys, data, llava, tmp_path):
    output = tmp_path / "out"
    code, _, err = run_cli(capsys, *eval_args(data, llava, output, "--datasets", "TQA", "--limit", "1"))
    assert code == 0, err
    argv = eval_args(data, llava, output, "--datasets", "TQA", "--limit", "1")
    argv[argv.index("0.5")] = "0.8"
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "holds results of a run with other settings (strategy differ)" in err
    code, out, err = run_cli(capsys, "eval", "milebench", "--data", data, "--output", output, "--merge")
    assert code == 2 and "samples without a prediction (ActionSequence: 5" in err


def test_milebench_user_errors_are_one_line(capsys, data, llava, tmp_path):
    text_model = save_tiny_text_model(tmp_path / "text")
    for argv, expected in [
        (eval_args(tmp_path / "none", llava, tmp_path / "o"), "MileBench data directory"),
        (eval_args(data, llava, tmp_path / "o", "--datasets", "NoSuchSet"), "NoSuchSet.json does not exist"),
        (eval_args(data, tmp_path / "nomodel", tmp_path / "o"), "does not exist"),
        (eval_args(data, text_model, tmp_path / "o"), "MileBench needs a vision-language model"),
        (["eval", "milebench", "--data", data, "--model", llava], "--model and --strategy are required"),
    ]:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and expected in err, err


def test_two_processes_under_accelerate_launch(data, llava, tmp_path):
    """CI's multi-process check: `accelerate launch` with 2 CPU processes (its torchrun launcher)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate is not installed (pip install 'kvpress-mm[eval]')")
    output = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
         "-m", "kvpress_mm", "eval", "milebench", "--data", str(data), "--model", str(llava),
         "--strategy", "lookm-pivotal", "--ratio", "0.8", "--output", str(output), "--max-new-tokens", "3",
         "--merge-timeout", "240", "--json", "--quiet"],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout)
    assert set(results["datasets"]) == set(DATASETS)
    assert sum(d["samples"] for d in results["datasets"].values()) == N_SAMPLES
    ranks = {path.name.rsplit(".", 2)[1] for path in (output / "predictions").glob("*.jsonl")}
    assert ranks == {"rank0", "rank1"}
    shutil.rmtree(output)
