"""Fixtures shared by several test modules."""

from __future__ import annotations

import logging
import re
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


# -- no warnings ------------------------------------------------------------------------------------
#
# Python warnings are errors (pyproject.toml: filterwarnings). transformers reports deprecations
# and misuse through its logger instead (`logger.warning_once`, e.g. reading `out.past_key_values`
# on 5.24+), which filterwarnings does not see: every test records the "transformers" logger at
# WARNING level and fails on any record, unless the test declares it expects it
# (`@pytest.mark.transformers_warning(pattern)`) or it is one of transformers' own below.

#: Warnings transformers logs because of its own calls, whatever the caller passed (regexes).
TRANSFORMERS_OWN_WARNINGS: tuple[str, ...] = (
    # assisted decoding: transformers' candidate generator calls the assistant's generate with both a
    # generation config and generation arguments (candidate_generator.py), on every round
    r"^Passing `generation_config` together with generation-related arguments",
    # assisted decoding: the candidate generator hands the assistant's generate the target's logits
    # processors and a copy of its generation config, from which generate builds the same ones again
    r"^A custom logits processor of type .* has been passed to `\.generate\(\)`, but it was also created",
)


class WarningRecords(logging.Handler):
    """The log records of WARNING level and above a logger handed this handler."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def unexpected_records(records: list[logging.LogRecord], allowed: list[str]) -> list[logging.LogRecord]:
    """The records whose message matches none of the ``allowed`` regexes."""
    return [r for r in records if not any(re.search(pattern, r.getMessage()) for pattern in allowed)]


@pytest.fixture(autouse=True)
def no_transformers_warnings(request: pytest.FixtureRequest) -> Iterator[WarningRecords]:
    """Fail the test on a transformers log warning it does not declare (see above); yields the records."""
    from transformers.utils import logging as transformers_logging

    logger = logging.getLogger("transformers")
    handler = WarningRecords()
    level = logger.level
    logger.setLevel(logging.WARNING)  # quiet_transformers() sets ERROR for the rest of the session
    logger.addHandler(handler)
    transformers_logging.warning_once.cache_clear()  # else a warning is logged once per process only
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    allowed = [*TRANSFORMERS_OWN_WARNINGS]
    for marker in request.node.iter_markers("transformers_warning"):
        allowed.extend(marker.args)
    unexpected = unexpected_records(handler.records, allowed)
    if unexpected:
        lines = "\n".join(f"  {r.name}:{r.lineno}: {r.getMessage()}" for r in unexpected)
        pytest.fail(f"transformers logged warnings this test does not expect:\n{lines}", pytrace=False)
