"""MileBench results: wait for every shard's predictions, merge, score, and write MileBench's files.

Process 0 waits until every selected sample has a prediction (the other processes exit after
their shard), then writes, in MileBench's own layout, ``{output}/{dataset}/pred.json``,
``eval.json`` and ``eval_score.json``, and the summaries ``{output}/results.json`` and
``{output}/results.csv`` (per dataset, per group, overall). ``kvpress-mm eval milebench
--merge`` does only this step, on whatever the output directory holds.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpress_mm.apps.eval.milebench import TAXONOMY, Dataset
from kvpress_mm.apps.eval.milebench_runner import RUN_CONFIG, PredictionStore
from kvpress_mm.apps.eval.milebench_scoring import DatasetScore, group_scores, score_dataset
from kvpress_mm.apps.tables import render_table
from kvpress_mm.errors import UsageError


def missing_predictions(output_dir: str | Path, datasets: Sequence[Dataset]) -> dict[str, int]:
    """Samples without a prediction yet, per dataset (datasets with none missing left out)."""
    missing = {}
    for dataset in datasets:
        done = PredictionStore(Path(output_dir), dataset.name, 0).load()
        count = sum(1 for sample in dataset.samples if sample.key not in done)
        if count:
            missing[dataset.name] = count
    return missing


def wait_for_predictions(
    output_dir: str | Path, datasets: Sequence[Dataset], timeout: float | None = None, poll: float = 1.0
) -> None:
    """Block until every sample has a prediction (the other processes' shards are done).

    Raises:
        UsageError: ``timeout`` seconds passed with predictions still missing.

    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        missing = missing_predictions(output_dir, datasets)
        if not missing:
            return
        if deadline is not None and time.monotonic() > deadline:
            detail = ", ".join(f"{name}: {count}" for name, count in missing.items())
            raise UsageError(
                f"gave up waiting for the other processes after {timeout:g} s; samples still missing ({detail}). "
                "Run the same command again (it resumes), or `--merge` once they are done"
            )
        time.sleep(poll)


@dataclass
class EvalReport:
    """The merged, scored results."""

    output_dir: str
    run_config: dict[str, Any]
    datasets: list[DatasetScore]
    groups: dict[str, float]
    memory: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``results.json``'s content."""
        return {
            "run": self.run_config,
            "datasets": {
                result.dataset: {
                    "group": result.group,
                    "metric": result.metric,
                    "score": result.score,
                    "samples": result.samples,
                    "image_quantity_level": result.by_quantity_level,
                    **self.memory.get(result.dataset, {}),
                }
                for result in self.datasets
            },
            "groups": self.groups,
            "taxonomy": {group: list(names) for group, names in TAXONOMY.items()},
        }


def _memory(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    before = sum(int(r.get("kv_bytes_before", 0)) for r in records)
    after = sum(int(r.get("kv_bytes_after", 0)) for r in records)
    n = max(len(records), 1)
    return {
        "mean_prompt_tokens": sum(int(r.get("prompt_tokens", 0)) for r in records) / n,
        "mean_kv_bytes_before": before / n,
        "mean_kv_bytes_after": after / n,
        "kv_kept_fraction": after / before if before else 1.0,
        "truncated_samples": sum(1 for r in records if r.get("truncated")),
    }


def merge(output_dir: str | Path, datasets: Sequence[Dataset]) -> EvalReport:
    """Merge every rank's predictions, score them and write MileBench's files and the summaries.

    Raises:
        UsageError: samples still have no prediction.

    """
    output = Path(output_dir)
    missing = missing_predictions(output, datasets)
    if missing:
        detail = ", ".join(f"{name}: {count}" for name, count in missing.items())
        raise UsageError(
            f"cannot score yet: samples without a prediction ({detail}); "
            "run the evaluation again (it resumes where it stopped)"
        )
    run_config_path = output / RUN_CONFIG
    run_config = json.loads(run_config_path.read_text(encoding="utf-8")) if run_config_path.is_file() else {}
    results: list[DatasetScore] = []
    memory: dict[str, dict[str, float]] = {}
    for dataset in datasets:
        records = PredictionStore(output, dataset.name, 0).load()
        ordered = [records[sample.key] for sample in dataset.samples]
        result = score_dataset(dataset, {key: str(r.get("pred_response", "")) for key, r in records.items()})
        results.append(result)
        memory[dataset.name] = _memory(ordered)
        directory = output / dataset.name
        directory.mkdir(parents=True, exist_ok=True)
        predictions = [{k: v for k, v in record.items() if k not in ("dataset", "rank")} for record in ordered]
        (directory / "pred.json").write_text(json.dumps(predictions, ensure_ascii=False, indent=2), encoding="utf-8")
        (directory / "eval.json").write_text(json.dumps(result.eval_json()), encoding="utf-8")
        scores = [{"id": str(s.sample_id), "score": str(round(s.score, 3))} for s in result.scores]
        (directory / "eval_score.json").write_text(json.dumps(scores, indent=4), encoding="utf-8")
    report = EvalReport(str(output), run_config, results, group_scores(results), memory)
    (output / "results.json").write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    _write_csv(output / "results.csv", report)
    return report


def _write_csv(path: Path, report: EvalReport) -> None:
    """One row per dataset, then one per group; scores in percent, as MileBench's ``result.csv``."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["kind", "name", "group", "metric", "score", "samples", "kv_kept_fraction"])
        for result in report.datasets:
            kept = report.memory.get(result.dataset, {}).get("kv_kept_fraction", 1.0)
            writer.writerow(
                [
                    "dataset",
                    result.dataset,
                    result.group,
                    result.metric,
                    f"{100 * result.score:.2f}",
                    result.samples,
                    f"{kept:.4f}",
                ]
            )
        for group, score in report.groups.items():
            count = sum(r.samples for r in report.datasets if _in_group(r.group, group))
            writer.writerow(["group", group, group, "mean of dataset scores", f"{100 * score:.2f}", count, ""])


def _in_group(dataset_group: str, group: str) -> bool:
    if group == "Overall":
        return True
    if group == "Diagnostic":
        return dataset_group.startswith("Diagnostic:")
    return dataset_group == group


def table(report: EvalReport) -> str:
    """Per-dataset and per-group scores (percent) with the KV memory kept."""
    rows = [
        [
            result.dataset,
            result.group,
            result.metric,
            f"{100 * result.score:.2f}",
            str(result.samples),
            f"{report.memory.get(result.dataset, {}).get('kv_kept_fraction', 1.0):.0%}",
        ]
        for result in report.datasets
    ]
    rows += [[f"[{group}]", "", "mean", f"{100 * score:.2f}", "", ""] for group, score in report.groups.items()]
    return render_table(["dataset", "group", "metric", "score", "samples", "KV kept"], rows, left=3)
