"""MileBench's on-disk format, its prompt construction and its dataset taxonomy.

MileBench (Song et al., 2024, "MileBench: Benchmarking MLLMs in Long Context") is the
multi-image long-context benchmark LOOK-M is evaluated on. This module reads its data
exactly as the reference code does; it was written from the MileBench repository
(github.com/MileBench/MileBench):

- ``generate.py`` (commit b2979ac6): a dataset is ``{data_dir}/{name}/{name}.json``; its
  images are under ``{data_dir}/{name}/images/``;
- ``utils.py`` (``MileBenchDataset.__getitem__``, commit 730e9305): the prompt construction
  reproduced by :func:`build_prompt`;
- ``workers/model_workers.py`` (LLaVA worker): ``<ImageHere><ImageHere>`` is spaced out with
  newlines, then each ``<ImageHere>`` becomes the model's image token;
- ``score.py``: the grouping of datasets (:data:`TAXONOMY`).

The JSON file::

    {
      "meta_data": {"task_instruction": ["instruction 0", ...], "question_type": "multi-choice" | "open-ended", ...},
      "data": [
        {
          "sample_id": 0,
          "task_instruction_id": 0,
          "task_instance": {
            "context": "... {image#1} ... {image#2} ... question",
            "images_path": ["0_1.jpg", "0_2.jpg"],
            "choice_list": ["...", "..."]          (multi-choice datasets only)
          },
          "response": "the answer (for multi-choice: one of choice_list)",
          "image_quantity_level": "Few" | "Medium" | "Many"    (optional)
        }
      ]
    }

``{image#k}`` (or ``{table#k}``) marks where image ``k`` goes. The prompt is the task
instruction, a newline, then the context (with the choice list appended for multi-choice
datasets); when it is too long, the context is cut from the left - whole text fragments and
images - so that the instruction and the question always survive (:func:`build_prompt`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpress_mm.errors import UsageError

#: MileBench's image placeholder inside prompts (``utils.py``).
IMAGE_PLACEHOLDER = "<ImageHere>"

#: Dataset groups, as in MileBench's ``score.py`` (with the diagnostic sets split as in the paper).
TAXONOMY: dict[str, tuple[str, ...]] = {
    "Realistic Temporal": (
        "ActionLocalization",
        "ActionPrediction",
        "ActionSequence",
        "CharacterOrder",
        "CounterfactualInference",
        "EgocentricNavigation",
        "MovingAttribute",
        "MovingDirection",
        "ObjectExistence",
        "ObjectInteraction",
        "ObjectShuffle",
        "SceneTransition",
        "StateChange",
    ),
    "Realistic Semantic": (
        "ALFRED",
        "CLEVR-Change",
        "DocVQA",
        "IEdit",
        "MMCoQA",
        "MultiModalQA",
        "nuscenes",
        "OCR-VQA",
        "SlideVQA",
        "Spot-the-Diff",
        "TQA",
        "WebQA",
        "WikiVQA",
    ),
    "Diagnostic: Needle in a Haystack": ("TextNeedleInAHaystack", "ImageNeedleInAHaystack"),
    "Diagnostic: Image Retrieval": ("GPR1200",),
}

OTHER_GROUP = "Other"


def _normalized(name: str) -> str:
    """``action_localization`` (score.py) and ``ActionLocalization`` (eval.sh) are the same dataset."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def dataset_group(name: str) -> str:
    """The :data:`TAXONOMY` group of a dataset (``"Other"`` for a dataset MileBench does not list)."""
    key = _normalized(name)
    for group, members in TAXONOMY.items():
        if any(_normalized(member) == key for member in members):
            return group
    return OTHER_GROUP


@dataclass
class Sample:
    """One MileBench sample."""

    sample_id: Any
    task_instruction_id: int
    context: str
    images: list[str]
    response: str
    choice_list: list[str] | None = None
    image_quantity_level: str | None = None

    @property
    def key(self) -> str:
        """The sample id as a string (ids are ints in MileBench's files)."""
        return str(self.sample_id)


@dataclass
class Dataset:
    """One MileBench dataset: its meta data, samples and image directory."""

    name: str
    question_type: str
    task_instructions: list[str]
    samples: list[Sample]
    image_dir: Path
    meta_data: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> str:
        """Its :data:`TAXONOMY` group."""
        return dataset_group(self.name)


def _field(container: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in container:
        raise UsageError(f"{where}: missing field '{key}'")
    value = container[key]
    if not isinstance(value, kind):
        raise UsageError(f"{where}: field '{key}' has the wrong type ({type(value).__name__})")
    return value


def load_dataset(data_dir: str | Path, name: str) -> Dataset:
    """Read ``{data_dir}/{name}/{name}.json``.

    Raises:
        UsageError: the file is missing, not JSON, or lacks a field the benchmark needs.

    """
    directory = Path(data_dir) / name
    file = directory / f"{name}.json"
    if not file.is_file():
        raise UsageError(f"MileBench dataset '{name}': {file} does not exist")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"MileBench dataset '{name}': {file} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise UsageError(f"MileBench dataset '{name}': {file} must hold an object with 'meta_data' and 'data'")
    meta = _field(document, "meta_data", str(file), dict)
    instructions = _field(meta, "task_instruction", f"{file} meta_data", list)
    question_type = _field(meta, "question_type", f"{file} meta_data", str)
    samples = []
    for index, entry in enumerate(_field(document, "data", str(file), list)):
        where = f"{file} data[{index}]"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: expected an object")
        instance = _field(entry, "task_instance", where, dict)
        instruction_id = _field(entry, "task_instruction_id", where, int)
        if not 0 <= instruction_id < len(instructions):
            raise UsageError(f"{where}: task_instruction_id {instruction_id} is not in meta_data.task_instruction")
        choices = instance.get("choice_list")
        samples.append(
            Sample(
                sample_id=_field(entry, "sample_id", where, (int, str)),
                task_instruction_id=instruction_id,
                context=_field(instance, "context", f"{where}.task_instance", str),
                images=[str(p) for p in _field(instance, "images_path", f"{where}.task_instance", list)],
                response=str(_field(entry, "response", where, (str, int, float))),
                choice_list=[str(c) for c in choices] if isinstance(choices, list) else None,
                image_quantity_level=entry.get("image_quantity_level"),
            )
        )
    return Dataset(name, question_type, [str(i) for i in instructions], samples, directory / "images", meta)


def discover_datasets(data_dir: str | Path) -> list[str]:
    """Names of the datasets under ``data_dir`` (directories ``{name}`` holding ``{name}.json``), sorted.

    Raises:
        UsageError: ``data_dir`` does not exist or holds no dataset.

    """
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"MileBench data directory '{data_dir}' does not exist")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / f"{p.name}.json").is_file())
    if not names:
        raise UsageError(
            f"'{data_dir}' holds no MileBench dataset (expected {{name}}/{{name}}.json, e.g. ALFRED/ALFRED.json)"
        )
    return names


@dataclass
class BuiltPrompt:
    """A sample's prompt: text with :data:`IMAGE_PLACEHOLDER` marks, and the images they stand for."""

    text: str
    image_paths: list[Path]
    truncated: bool


def _context_with_choices(dataset: Dataset, sample: Sample) -> str:
    context = sample.context
    if sample.choice_list is not None:
        # GPR1200 has more than 26 options: MileBench lists them without letters
        letters = dataset.name != "GPR1200"
        choices = "\n".join(
            (f"{chr(65 + index)}. " if letters else "") + item for index, item in enumerate(sample.choice_list)
        )
        context += "\nChoice list: \n" + choices + "\nYour answer is: "
    for index in range(len(sample.images)):
        context = context.replace(f"{{image#{index + 1}}}", IMAGE_PLACEHOLDER)
        context = context.replace(f"{{table#{index + 1}}}", IMAGE_PLACEHOLDER)
    return context


def build_prompt(
    dataset: Dataset,
    sample: Sample,
    count_tokens: Callable[[str], Sequence[int]],
    decode: Callable[[Sequence[int]], str],
    max_context_len: int,
    tokens_per_image: int,
) -> BuiltPrompt:
    """The sample's prompt, as ``MileBenchDataset.__getitem__`` builds it.

    The context is split at the image placeholders and walked from the end: each text
    fragment, then the image before it, is kept while the running token count (images count
    ``tokens_per_image`` each) fits in ``max_context_len`` minus the instruction's tokens. The
    first fragment that does not fit ends the walk; when even the last fragment (the question)
    does not fit, its last tokens are kept. The instruction and a newline go first.

    One deliberate difference: fragments kept whole are kept as written, where MileBench
    re-decodes every fragment from its tokens (a round trip that can alter spacing); only a
    cut fragment is decoded from its kept tokens here.

    Args:
        dataset: the sample's dataset.
        sample: the sample.
        count_tokens: the tokenizer without special tokens (text -> ids).
        decode: ids -> text.
        max_context_len: token budget of the prompt (the model's window minus the answer's).
        tokens_per_image: placeholder tokens an image takes in this model.

    """
    instruction = dataset.task_instructions[sample.task_instruction_id]
    context = _context_with_choices(dataset, sample)
    remaining_images = [dataset.image_dir / path for path in sample.images]
    budget = max_context_len - len(count_tokens(instruction))
    chunks: list[str] = []
    kept_images: list[Path] = []
    used = 0
    image_start = False
    cut = False
    fragments = context.split(IMAGE_PLACEHOLDER)
    for fragment in reversed(fragments):
        ids = count_tokens(fragment)
        if len(ids) + used > budget:
            if not chunks:  # the question alone is too long: keep its end
                chunks.insert(0, decode(list(ids)[-budget:]) if budget > 0 else "")
                cut = True
            break
        image_start = False
        chunks.insert(0, fragment)
        used += len(ids)
        if tokens_per_image + used > budget:
            break
        if remaining_images:
            image_start = True
            kept_images.insert(0, remaining_images.pop())
            used += tokens_per_image
    text = IMAGE_PLACEHOLDER.join(chunks)
    if image_start:
        text = IMAGE_PLACEHOLDER + text
    text = instruction + "\n" + text
    # MileBench's LLaVA worker: two adjacent images are put on their own lines (CLEVR-Change)
    text = text.replace(IMAGE_PLACEHOLDER * 2, f"{IMAGE_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}\n")
    if text.count(IMAGE_PLACEHOLDER) != len(kept_images):
        raise UsageError(
            f"MileBench dataset '{dataset.name}' sample {sample.sample_id}: the context has "
            f"{text.count(IMAGE_PLACEHOLDER)} image mark(s) ({{image#k}}) for {len(kept_images)} kept image(s)"
        )
    truncated = cut or len(chunks) < len(fragments) or len(kept_images) < len(sample.images)
    return BuiltPrompt(text, kept_images, truncated)
