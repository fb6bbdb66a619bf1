"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from reference_fixtures import save_reference_checkpoint


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained reference-model checkpoint directory (see :mod:`reference_fixtures`)."""
    return save_reference_checkpoint(tmp_path_factory.mktemp("reference") / "checkpoint")
