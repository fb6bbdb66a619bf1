"""Asking the reference model questions on a compressed context: the prompt split, batched answers.

Each task prompt is split in two (:func:`split_prompt`): a *head* prefilled under the compressor
and compressed, and a *tail* run afterwards on the compressed cache, whose last position's
greedy token is the answer. With mode ``question`` the head is the context and the tail the
question (the strategy never sees the question); with ``last-token`` the head is everything but
the prompt's last token. A plain ``model.generate(**inputs, max_new_tokens=1)`` would not show
the effect of compression: its one token comes from the prefill, which attends to the whole
prompt before the cache is compressed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvpress_mm.apps.reference.model import PAD_ID
from kvpress_mm.apps.reference.render import encode_words, pixel_values, word_ids
from kvpress_mm.apps.reference.tasks import TaskPrompt
from kvpress_mm.compressor import Compressor

MODES = ("question", "last-token")


def split_prompt(prompt: TaskPrompt, mode: str) -> tuple[list[str], list[str]]:
    """The words prefilled under compression and the words run afterwards on the compressed cache."""
    if mode == "question":
        return list(prompt.context.words), list(prompt.question.words)
    if mode == "last-token":
        return list(prompt.words[:-1]), list(prompt.words[-1:])
    raise ValueError(f"unknown mode {mode!r}; the modes are {', '.join(MODES)}")


@torch.no_grad()
def answer_logits(
    model: Any,
    compressor: Compressor,
    prompts: Sequence[TaskPrompt],
    mode: str = "question",
    new_cache: Callable[[], Any] | None = None,
) -> tuple[torch.Tensor, float]:
    """Next-token logits ``[B, vocab]`` after each prompt with a compressed cache, and the mean kept fraction.

    The prompts must share one task kind (their tails have the same length). The heads are
    left-padded and prefilled in one call under ``compressor``, with positions counted over each
    row's real tokens (as ``generate`` counts them); the tails then run in one call on the
    compressed cache with the whole conversation's attention mask and each row's next positions.
    ``new_cache`` builds the cache the heads are prefilled into (e.g. a ``QuantizedCache``);
    default: the model's own (a ``DynamicCache``).
    """
    heads, tails = zip(*(split_prompt(p, mode) for p in prompts))
    if len({len(t) for t in tails}) != 1:
        raise ValueError("the prompts of one batch must have tails of one length (one task kind)")
    head_ids = [encode_words(h) for h in heads]
    ids = word_ids()
    tail_ids = torch.tensor([[ids[w] for w in t] for t in tails])  # [B, T]
    width = max(len(h) for h in head_ids)
    input_ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, h in enumerate(head_ids):
        input_ids[i, width - len(h) :] = torch.tensor(h)
        mask[i, width - len(h) :] = 1
    images = pixel_values([g for p in prompts for g in p.images])
    # positions count real tokens only (as generate does): a left-padded row starts at 0, so its
    # tail continues where its own head ends (without them, the head's positions would be shifted
    # by the row's padding and the tail's would not: RoPE distances across the split would be wrong)
    head_positions = (mask.cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    given = {} if new_cache is None else {_cache_argument(model): new_cache()}
    with compressor(model) as session:
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=head_positions.to(device),
            pixel_values=images.to(device),
            use_cache=True,
            **given,
        )
        kept = sum(session.report.n_keep) / max(1, sum(session.report.prompt_lengths))
        n_tail = tail_ids.shape[1]
        full_mask = torch.cat([mask, torch.ones_like(tail_ids)], dim=1)
        positions = mask.sum(-1, keepdim=True) + torch.arange(n_tail)[None]  # continue each row's positions
        cache = {_cache_argument(model): _output_cache(out)}
        logits = model(
            input_ids=tail_ids.to(device),
            attention_mask=full_mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **cache,
        ).logits[:, -1]
    return logits.float().cpu(), kept


def answer_batch(
    model: Any,
    compressor: Compressor,
    prompts: Sequence[TaskPrompt],
    mode: str = "question",
    new_cache: Callable[[], Any] | None = None,
) -> tuple[list[int], float]:
    """Greedy answer token of each prompt with a compressed cache, and the mean kept fraction.

    See :func:`answer_logits`: the prompts must share one task kind.
    """
    logits, kept = answer_logits(model, compressor, prompts, mode, new_cache)
    return logits.argmax(-1).tolist(), kept


def _cache_argument(model: Any) -> str:
    """The forward argument that takes a cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _output_cache(output: Any) -> Any:
    """The cache a forward returned (``output.cache`` from transformers 5.24, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
