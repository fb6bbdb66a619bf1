"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.reference_fixtures import save_reference_checkpoint

# one thread per test process: tiny models run fastest on one, and the other core stays free
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained reference-model checkpoint directory (see :mod:`reference_fixtures`)."""
    return save_reference_checkpoint(tmp_path_factory.mktemp("reference") / "checkpoint")


@pytest.fixture
def restore_torch_threads() -> Iterator[None]:
    """The test process's torch thread count back after the test (a command sets it for its process).

    Modules whose tests run commands use it for every test: ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
