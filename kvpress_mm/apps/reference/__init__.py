"""A tiny reference VLM trained on synthetic multimodal tasks, shipped with the package.

It gives the accuracy benchmark (``kvpress-mm bench accuracy``) a model whose answers
depend on the KV cache: a LLaVA (CLIP + Llama) model of about half a million parameters that
answers one-token questions about 1 to 12 images of coloured cells and text facts.

```python
from kvpress_mm import Compressor
from kvpress_mm.apps.reference.questions import answer_batch
from kvpress_mm.apps.reference import heldout_prompts, load_reference_model

model, processor = load_reference_model()  # the shipped checkpoint (or pass a directory)
prompts = [p for p in heldout_prompts(n_images=8, contexts=4) if p.kind == "lookup"]
# the context is compressed first, then the question is asked on the compressed cache
answers, kept = answer_batch(model, Compressor.from_name("snapkv", compression_ratio=0.8), prompts)
print(processor.tokenizer.convert_ids_to_tokens(answers), [p.answer for p in prompts])
```

(A plain ``model.generate(..., max_new_tokens=1)`` under a compressor would not show the effect
of compression: its one token comes from the prefill, before the cache is compressed.)
"""

from kvpress_mm.apps.reference.model import CHECKPOINT_DIR, load_reference_model
from kvpress_mm.apps.reference.render import encode_prompts, pixel_values, render_image
from kvpress_mm.apps.reference.tasks import TASK_KINDS, TaskGenerator, TaskPrompt, heldout_prompts

__all__ = [
    "CHECKPOINT_DIR",
    "TASK_KINDS",
    "TaskGenerator",
    "TaskPrompt",
    "encode_prompts",
    "heldout_prompts",
    "load_reference_model",
    "pixel_values",
    "render_image",
]
