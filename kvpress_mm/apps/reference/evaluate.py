"""Full-cache accuracy of a reference model on task prompts (greedy next token = the answer?)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvpress_mm.apps.reference.render import encode_prompts, word_ids
from kvpress_mm.apps.reference.tasks import TASK_KINDS, TaskPrompt


@torch.no_grad()
def predict(model: Any, prompts: Sequence[TaskPrompt], batch_size: int = 64) -> list[int]:
    """The greedy next-token id after each prompt, with the full cache (one forward per batch).

    Rows are left-padded and given positions from the attention mask, so each prediction is
    what ``model.generate(**encode_prompts([prompt]), max_new_tokens=1)`` returns.
    """
    out: list[int] = []
    for start in range(0, len(prompts), batch_size):
        inputs = encode_prompts(prompts[start : start + batch_size])
        position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = model(**inputs, position_ids=position_ids, logits_to_keep=1).logits[:, -1]
        out.extend(logits.argmax(-1).tolist())
    return out


def accuracy_by_kind(model: Any, prompts: Sequence[TaskPrompt], batch_size: int = 64) -> dict[str, float]:
    """Fraction of prompts answered right, per task kind (only the kinds present), full cache."""
    ids = word_ids()
    predicted = predict(model, prompts, batch_size)
    right: dict[str, list[bool]] = {}
    for prompt, token in zip(prompts, predicted):
        right.setdefault(prompt.kind, []).append(token == ids[prompt.answer])
    return {kind: sum(right[kind]) / len(right[kind]) for kind in TASK_KINDS if kind in right}
