"""The wrapper shown in docs/writing-a-plugin.md, run as written (the code block is read from the page)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch

from kvpress_mm import Compressor
from kvpress_mm.registry import Registry, get_registry
from tests.helpers.masked_reference import PlanRecorder, cache_of
from tests.helpers.tiny_models import build, generate, prompt

PAGE = Path(__file__).resolve().parents[2] / "docs" / "writing-a-plugin.md"


def _tutorial_module() -> dict[str, Any]:
    text = PAGE.read_text(encoding="utf-8")
    block = re.search(r'```python title="skip_layers.py"\n(.*?)```', text, re.S)
    assert block is not None, "the wrapper example is gone from the tutorial"
    namespace: dict[str, Any] = {"__name__": "skip_layers"}
    exec(compile(block.group(1), "skip_layers.py", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


@pytest.fixture
def skip_layers(monkeypatch: pytest.MonkeyPatch) -> Any:
    namespace = _tutorial_module()
    registry: Registry = get_registry()
    namespace["kvpress_mm_register_strategies"](
        register=lambda name, cls: monkeypatch.setitem(registry.strategies, name, _info(name, cls))
    )
    return namespace["SkipLayers"]


def _info(name: str, cls: type) -> Any:
    from kvpress_mm.registry import StrategyInfo

    return StrategyInfo(name, cls, "plugin 'tutorial'")


def test_the_tutorial_wrapper_works_as_documented(skip_layers: Any) -> None:
    compressor = Compressor.from_name("skip-layers", inner="knorm", skip=1, compression_ratio=0.8)
    assert isinstance(compressor, skip_layers)
    assert compressor.to_config() == {
        "strategy": "skip-layers",
        "compression_ratio": 0.8,
        "inner": {"strategy": "knorm", "compression_ratio": 0.8, "window_size": 0},
        "skip": 1,
    }
    assert Compressor.from_config(compressor.to_config()) == compressor
    with pytest.raises(pydantic.ValidationError, match="meaningless"):
        Compressor.from_name("skip-layers", inner={"strategy": "skip-layers"})
    model = build("llama", "sdpa")
    recorder = PlanRecorder()
    with recorder.recording(), compressor(model):
        out = generate(model, prompt(30), max_new_tokens=2)
    kept = [plans[0].length_after for plans in recorder.per_layer(cache_of(out)).values()]
    assert kept == [30, int(30 * (1 - 0.8))]
    assert torch.isfinite(torch.stack(out.logits)).all()
