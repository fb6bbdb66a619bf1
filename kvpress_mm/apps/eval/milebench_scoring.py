"""MileBench's scoring: answer normalisation, option matching, needle match, ROUGE-L, aggregates.

A port of the ``Eval`` class of MileBench's ``evaluate.py`` (github.com/MileBench/MileBench,
commit 730e9305), kept faithful to its quirks so that scores compare with published ones:

- datasets whose name contains ``NeedleInAHaystack``: the normalised ground truth must be one
  of the normalised answer's whitespace-separated words; ``MMCoQA``: a substring of it;
- ``question_type == "open-ended"``: ROUGE-L F-measure (:mod:`kvpress_mm.apps.eval.rouge`; an empty
  answer scores 0);
- ``question_type == "multi-choice"``: the chosen option is extracted from the answer
  (:func:`match_choice`: ``"A. text"``, then the option text, then a lone letter, then the
  answer's option letters) and must be the ground truth's letter.

Kept quirks: an empty answer counts as option ``C``; ``re.sub``'s third positional argument is
a count, so at most 32 periods are stripped; a failed option regex returns the raw answer.
One fix: the per-``image_quantity_level`` breakdown of open-ended datasets uses each sample's
own level (``evaluate_rouge`` used the last sample's for all).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvpress_mm.apps.eval.milebench import Dataset, Sample, dataset_group
from kvpress_mm.apps.eval.rouge import rouge_l

_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCTUATION = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_REGEX_SPECIAL = ["\\", ".", "^", "$", "*", "+", "?", "{", "}", "[", "]", "|", "(", ")"]
QUANTITY_LEVELS = ("Few", "Medium", "Many")


def _process_punctuation(text: str) -> str:
    output = text
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or (re.search(_COMMA_STRIP, text) is not None):
            output = output.replace(mark, "")
        else:
            output = output.replace(mark, " ")
    return _PERIOD_STRIP.sub("", output, 32)  # MileBench passes re.UNICODE (32) as the count


def normalize(answer: str) -> str:
    """MileBench's ``Eval.process``: whitespace, punctuation, quotes, lower case."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    answer = _process_punctuation(answer)
    return answer.strip("'").strip('"').strip().lower()


def _option_pattern(text: str) -> str:
    processed = normalize(text)
    for char in _REGEX_SPECIAL:
        if char in processed:
            processed = processed.replace(char, "\\" + char)
    return processed


def match_choice(text: str, options: Mapping[str, str]) -> str:
    """The option letter(s) an answer picks (MileBench's ``Eval.match_choice``)."""
    if text == "":
        return "C"
    try:
        pattern = "|".join(_option_pattern(f"{key} {value}") for key, value in options.items())
        found = re.search(rf"({pattern})", text, re.S)
        if found:
            return found.group(0)[0].upper()
        pattern = "|".join(_option_pattern(value).replace(" ", "") for value in options.values())
        found = re.search(rf"({pattern})", text.replace(" ", ""), re.S)
        if found:
            for key, value in options.items():
                if found[0].strip() == _option_pattern(value).replace(" ", ""):
                    return key.upper()
        if len(text) == 1 and text.upper() in options:
            return text.upper()
    except Exception:  # MileBench prints the error and returns the answer itself
        return text
    return "".join(char.upper() for char in text if char.upper() in options)


@dataclass
class SampleScore:
    """One sample's score (0/1 for accuracy metrics, in [0, 1] for ROUGE-L)."""

    sample_id: Any
    score: float
    error: str | None = None


def score_sample(dataset: Dataset, sample: Sample, prediction: str) -> SampleScore:
    """Score one prediction the way MileBench scores the sample's dataset."""
    ground_truth = normalize(sample.response)
    answer = normalize(prediction)
    if "NeedleInAHaystack" in dataset.name or "MMCoQA" in dataset.name:
        if "NeedleInAHaystack" in dataset.name:
            return SampleScore(sample.sample_id, float(ground_truth in answer.split()))
        return SampleScore(sample.sample_id, float(ground_truth in answer))
    if dataset.question_type == "open-ended":
        return SampleScore(sample.sample_id, 0.0 if answer == "" else rouge_l(answer, ground_truth))
    if dataset.question_type == "multi-choice":
        choices = [normalize(choice) for choice in sample.choice_list or []]
        if ground_truth not in choices:
            return SampleScore(sample.sample_id, 0.0, "the ground truth is not one of the choices")
        options = {chr(65 + index): choice for index, choice in enumerate(choices)}
        expected = chr(65 + choices.index(ground_truth))
        return SampleScore(sample.sample_id, float(match_choice(answer, options) == expected))
    raise ValueError(f"dataset {dataset.name}: unsupported question_type {dataset.question_type!r}")


def metric_name(dataset: Dataset) -> str:
    """``"Rouge-L f"`` or ``"Accuracy"``, as in MileBench's ``eval.json``."""
    needle = "NeedleInAHaystack" in dataset.name or "MMCoQA" in dataset.name
    return "Rouge-L f" if dataset.question_type == "open-ended" and not needle else "Accuracy"


@dataclass
class DatasetScore:
    """A dataset's result: its metric over the scored samples, and the per-level breakdown."""

    dataset: str
    group: str
    metric: str
    score: float
    samples: int
    by_quantity_level: dict[str, float] = field(default_factory=dict)
    scores: list[SampleScore] = field(default_factory=list)

    def eval_json(self) -> dict[str, Any]:
        """MileBench's ``eval.json`` for this dataset."""
        return {self.metric: self.score, "image_quantity_level-Accuracy": self.by_quantity_level}


def score_dataset(
    dataset: Dataset, predictions: Mapping[str, str], samples: Iterable[Sample] | None = None
) -> DatasetScore:
    """Score ``predictions`` (sample key -> answer) over ``samples`` (default: all of the dataset's).

    Raises:
        KeyError: a sample has no prediction.

    """
    chosen = list(samples if samples is not None else dataset.samples)
    scores = [score_sample(dataset, sample, predictions[sample.key]) for sample in chosen]
    levels: dict[str, list[float]] = {level: [] for level in QUANTITY_LEVELS}
    for sample, result in zip(chosen, scores):
        if sample.image_quantity_level is not None:
            levels.setdefault(str(sample.image_quantity_level), []).append(result.score)
    by_level = {level: statistics.fmean(values) if values else 0.0 for level, values in levels.items()}
    return DatasetScore(
        dataset=dataset.name,
        group=dataset_group(dataset.name),
        metric=metric_name(dataset),
        score=statistics.fmean(s.score for s in scores) if scores else 0.0,
        samples=len(scores),
        by_quantity_level=by_level,
        scores=scores,
    )


def group_scores(results: Iterable[DatasetScore]) -> dict[str, float]:
    """The mean dataset score of each group present, plus ``"Overall"`` (mean over datasets)."""
    results = list(results)
    groups: dict[str, list[float]] = {}
    for result in results:
        groups.setdefault(result.group, []).append(result.score)
        if result.group.startswith("Diagnostic:"):
            groups.setdefault("Diagnostic", []).append(result.score)
    summary = {group: statistics.fmean(values) for group, values in groups.items()}
    if results:
        summary["Overall"] = statistics.fmean(r.score for r in results)
    return summary
