"""kvpress-mm: KV-cache compression for Hugging Face vision-language and text models.

```python
from kvpress_mm import Compressor

compressor = Compressor.from_name("lookm-pivotal", compression_ratio=0.8)
with compressor(model):
    out = model.generate(**inputs, max_new_tokens=64)
```
"""

from kvpress_mm.cache.fork import fork_cache
from kvpress_mm.compressor import Compressor, ScoredCompressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.modality import Modality
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.views import DecodeView, LayerView
from kvpress_mm.registry import list_strategies
from kvpress_mm.session import CompressionReport, CompressionSession

__version__ = "0.1.0"

__all__ = [
    "CompressionPlan",
    "CompressionReport",
    "CompressionSession",
    "Compressor",
    "DecodeView",
    "LayerView",
    "Modality",
    "ScoredCompressor",
    "__version__",
    "fork_cache",
    "hookimpl",
    "list_strategies",
]
