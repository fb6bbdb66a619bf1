"""A tiny MileBench-format data directory for tests: three datasets, a few samples, small PNGs.

The layout and fields follow MileBench's ``generate.py`` / ``utils.py`` / ``evaluate.py``
(github.com/MileBench/MileBench): ``{root}/{name}/{name}.json`` with ``meta_data``
(``task_instruction`` list, ``question_type``) and ``data`` samples (``sample_id``,
``task_instruction_id``, ``task_instance`` with ``context`` / ``images_path`` /
``choice_list``, ``response``, ``image_quantity_level``); images in ``{root}/{name}/images/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvpress_mm.apps.prompts import synthetic_image

#: dataset -> (question_type, number of samples)
DATASETS = {
    "ActionSequence": ("multi-choice", 5),  # Realistic Temporal
    "TQA": ("open-ended", 4),  # Realistic Semantic
    "TextNeedleInAHaystack": ("open-ended", 3),  # Diagnostic: needle (scored by word match)
}

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["square", "circle", "triangle", "cross"]


def write_milebench(root: Path, datasets: dict[str, tuple[str, int]] | None = None, pixels: int = 32) -> Path:
    """Write the fixture under ``root`` and return ``root``."""
    for name, (question_type, count) in (datasets or DATASETS).items():
        directory = root / name
        (directory / "images").mkdir(parents=True, exist_ok=True)
        samples = []
        for index in range(count):
            n_images = 1 + index % 3
            paths = []
            for k in range(n_images):
                colour, shape = COLOURS[(index + k) % len(COLOURS)], SHAPES[(index * 2 + k) % len(SHAPES)]
                path = f"{index}_{k + 1}.png"
                synthetic_image(colour, shape, "white", pixels=pixels).save(directory / "images" / path)
                paths.append(path)
            context = " ".join(f"photo {k + 1} : {{image#{k + 1}}} ." for k in range(n_images))
            instance = {"context": f"{context} question : what shape is in photo 1 ?", "images_path": paths}
            answer = SHAPES[(index * 2) % len(SHAPES)]
            if question_type == "multi-choice":
                instance["choice_list"] = list(SHAPES)
            samples.append(
                {
                    "sample_id": index,
                    "task_instruction_id": index % 2,
                    "task_instance": instance,
                    "response": answer,
                    "image_quantity_level": ["Few", "Medium", "Many"][index % 3],
                }
            )
        document = {
            "meta_data": {
                "dataset": name,
                "split": "test",
                "num_sample": count,
                "task_instruction": [
                    "look at the photos and answer the question .",
                    "answer the question about the photos with one word .",
                ],
                "question_type": question_type,
            },
            "data": samples,
        }
        (directory / f"{name}.json").write_text(json.dumps(document, indent=2), encoding="utf-8")
    return root
