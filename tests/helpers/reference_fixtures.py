"""A reference-model checkpoint for tests: the shipped architecture, untrained, saved as training saves it.

Its answers are at chance, so tests use it for mechanics (loading, encoding, positions and masks,
the commands' output), never for accuracy; ``test_shipped_model_accuracy`` checks the shipped,
trained checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from kvpress_mm.apps.reference.train import TrainConfig, build_model, save
from tests.helpers.cli_fixtures import quiet_transformers


def save_reference_checkpoint(directory: Path) -> Path:
    """An untrained reference model (seeded) with its processor and a ``training.json``, as training saves them."""
    quiet_transformers()
    model = build_model(TrainConfig())
    model.eval()
    save(model, directory, {"note": "untrained test checkpoint"})
    return directory
