"""The benchmark scripts (benchmarks/*.py, not a package) loaded as modules, for their smoke tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``name``, seeing its sibling modules as it does when run."""
    if str(BENCHMARKS) not in sys.path:
        # run as a script, a benchmark has its directory first on sys.path: it imports bench_common and
        # kvpress_compare imports decode as siblings
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module
