"""Turning task prompts into the reference model's inputs: token ids with image placeholders, pixel values.

No processor (and no torchvision) is needed: images are solid 14 px cells, so their normalised
pixels are computed directly; the result equals what the shipped ``LlavaProcessor`` gives for
the same text and PIL images (a test checks it).

```python
from kvpress_mm.apps.reference import encode_prompts, heldout_prompts, load_reference_model

model, processor = load_reference_model()
prompt = heldout_prompts(n_images=8, contexts=1)[0]
inputs = encode_prompts([prompt])
out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
print(processor.tokenizer.decode(out[0, -1]), "expected", prompt.answer)
```
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from kvpress_mm.apps.reference.model import (
    BOS_ID,
    IMAGE_MEAN,
    IMAGE_SIZE,
    IMAGE_STD,
    IMAGE_TOKEN_ID,
    PAD_ID,
    PATCH_SIZE,
    TOKENS_PER_IMAGE,
)
from kvpress_mm.apps.reference.tasks import COLOURS, IMAGE_WORD, RGB, ColourGrid, Context, TaskPrompt, vocabulary

if TYPE_CHECKING:
    from kvpress_mm.apps.prompts import Prompt


@lru_cache(maxsize=1)
def word_ids() -> dict[str, int]:
    """Word -> token id (the tokenizer's vocabulary)."""
    return {w: i for i, w in enumerate(vocabulary())}


def encode_words(words: Sequence[str]) -> list[int]:
    """``<bos>`` then the words' ids, each ``<image>`` expanded to its 4 placeholder tokens."""
    ids = word_ids()
    out = [BOS_ID]
    for w in words:
        if w == IMAGE_WORD:
            out.extend([IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE)
        else:
            out.append(ids[w])
    return out


def render_image(grid: ColourGrid) -> Any:
    """The image as a 28x28 RGB ``PIL.Image`` (each cell a solid 14 px square)."""
    from PIL import Image

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    for c, colour in enumerate(grid.cells):
        row, col = divmod(c, 2)
        image.paste(RGB[colour], (col * PATCH_SIZE, row * PATCH_SIZE, (col + 1) * PATCH_SIZE, (row + 1) * PATCH_SIZE))
    return image


@lru_cache(maxsize=1)
def _normalised_colours() -> torch.Tensor:
    """``[n_colours, 3]`` normalised pixel value of each colour (rescale 1/255, CLIP mean/std)."""
    rgb = torch.tensor([RGB[c] for c in COLOURS], dtype=torch.float64) / 255.0
    return (
        (rgb - torch.tensor(IMAGE_MEAN, dtype=torch.float64)) / torch.tensor(IMAGE_STD, dtype=torch.float64)
    ).float()


def pixel_values(grids: Sequence[ColourGrid]) -> torch.Tensor:
    """``[n_images, 3, 28, 28]`` float32 normalised pixels of the images, in order."""
    if not grids:
        return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    colour_index = {c: i for i, c in enumerate(COLOURS)}
    idx = torch.tensor([[colour_index[c] for c in g.cells] for g in grids])  # [n, 4]
    cells = _normalised_colours()[idx]  # [n, 4, 3]
    grid = cells.view(-1, 2, 2, 3).permute(0, 3, 1, 2)  # [n, 3, 2, 2]
    return grid.repeat_interleave(PATCH_SIZE, dim=2).repeat_interleave(PATCH_SIZE, dim=3).contiguous()


def encode_prompts(prompts: Sequence[TaskPrompt], padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Model inputs for a batch of prompts: ``input_ids``, ``attention_mask``, ``pixel_values``.

    Rows are padded on ``padding_side`` (``"left"`` for generation) with ``<pad>``; the
    ``pixel_values`` of all prompts' images are stacked in row order, as LLaVA expects.
    """
    rows = [encode_words(p.words) for p in prompts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        input_ids[i, span] = torch.tensor(r)
        attention_mask[i, span] = 1
    grids = [g for p in prompts for g in p.images]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values(grids)}


def encode_context(context: Context) -> dict[str, torch.Tensor]:
    """Model inputs (a batch of one, no padding) of a context alone, without a question."""
    ids = encode_words(context.words)
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": pixel_values(context.images),
    }


def to_prompt(prompt: TaskPrompt, name: str | None = None) -> Prompt:
    """The task prompt as a ``kvpress_mm.apps.prompts.Prompt``: its text, one PIL image per ``<image>``.

    This is what the commands feed to a model's processor (``kvpress-mm bench fidelity`` on the
    reference model); the processor's inputs equal :func:`encode_prompts`'.
    """
    from kvpress_mm.apps.prompts import Prompt

    images = [render_image(g) for g in prompt.images]
    return Prompt.from_text(prompt.text, images, IMAGE_WORD, name=name or prompt.kind)
