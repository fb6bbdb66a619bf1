"""kvpress-mm-keynorm: the ``keynorm`` KV-cache compression strategy as a kvpress-mm plugin.

kvpress-mm finds this module through the entry point declared in ``pyproject.toml``
(group ``kvpress_mm``), registers it as a pluggy plugin and calls its hook implementation.
After ``pip install kvpress-mm-keynorm``:

```python
from kvpress_mm import Compressor

compressor = Compressor.from_name("keynorm", compression_ratio=0.5, window_size=8)
with compressor(model):
    out = model.generate(**inputs, max_new_tokens=64)
```
"""

from __future__ import annotations

from collections.abc import Callable

from kvpress_mm import Compressor, hookimpl

from kvpress_mm_keynorm.keynorm import KeyNorm

__version__ = "0.1.0"

__all__ = ["KeyNorm", "__version__", "kvpress_mm_register_strategies"]


@hookimpl
def kvpress_mm_register_strategies(register: Callable[[str, type[Compressor]], None]) -> None:
    """Register ``keynorm``."""
    register("keynorm", KeyNorm)
