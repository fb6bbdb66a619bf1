"""The suite's warning checks have teeth: Python warnings are errors, transformers' log warnings are seen.

transformers 5.24 renamed the cache argument ``past_key_values`` to ``cache``: the old name on a
call is a ``FutureWarning`` (a Python warning), on an output a log warning of transformers'
logger, printed once per process. Both would be our code's deprecations; both must fail a test.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.conftest import WarningRecords, unexpected_records
from tests.helpers.tiny_models import build, prompt


def test_a_python_warning_is_an_error() -> None:
    model = build("llama")
    ids = prompt(8)
    with pytest.raises(FutureWarning, match="past_key_values"), torch.no_grad():
        model(ids, past_key_values=None)  # the name transformers 5.24+ deprecates


@pytest.mark.transformers_warning("deprecated")
def test_a_transformers_log_warning_is_recorded(no_transformers_warnings: WarningRecords) -> None:
    model = build("llama")
    with torch.no_grad():
        out = model(prompt(8), use_cache=True)
    assert not no_transformers_warnings.records
    out.past_key_values  # noqa: B018 - the deprecated name on an output: a log warning, once per process
    messages = [r.getMessage() for r in no_transformers_warnings.records]
    assert any("deprecated" in m and "cache" in m for m in messages), messages
    # without this test's marker, the record would fail it
    assert unexpected_records(no_transformers_warnings.records, []) == no_transformers_warnings.records
    assert unexpected_records(no_transformers_warnings.records, ["deprecated"]) == []


def test_transformers_logs_at_warning_level_in_every_test() -> None:
    # the command tests quiet transformers (ERROR) for the session: the check restores WARNING per test
    assert logging.getLogger("transformers").getEffectiveLevel() == logging.WARNING
