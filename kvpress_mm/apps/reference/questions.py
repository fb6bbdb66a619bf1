"""Asking the reference model questions on a compressed context: the prompt split, batched answers.

Each task prompt is split in two (:func:`split_prompt`): a *head* prefilled under the compressor
and compressed, and a *tail* run afterwards on the compressed cache, whose last position's
greedy token is the answer. With mode ``question`` the head is the context and the tail the
question (the strategy never sees the question); with ``last-token`` the head is everything but
the prompt's last token. A plain ``model.generate(**inputs, max_new_tokens=1)`` would not show
the effect of compression: its one token comes from the prefill, which attends to the whole
prompt before the cache is compressed.

Questions of several kinds about the same contexts share one compressed prefill
(:func:`answer_logits_per_batch`): each kind asks on a :func:`~kvpress_mm.fork_cache` of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvpress_mm.apps.reference.model import PAD_ID
from kvpress_mm.apps.reference.render import encode_words, pixel_values, word_ids
from kvpress_mm.apps.reference.tasks import TaskPrompt
from kvpress_mm.cache.fork import fork_cache
from kvpress_mm.compressor import Compressor

MODES = ("question", "last-token")


def split_prompt(prompt: TaskPrompt, mode: str) -> tuple[list[str], list[str]]:
    """The words prefilled under compression and the words run afterwards on the compressed cache."""
    if mode == "question":
        return list(prompt.context.words), list(prompt.question.words)
    if mode == "last-token":
        return list(prompt.words[:-1]), list(prompt.words[-1:])
    raise ValueError(f"unknown mode {mode!r}; the modes are {', '.join(MODES)}")


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
    logits, kept = answer_logits_per_batch(model, compressor, [prompts], mode, new_cache)
    return logits[0], kept[0]


@torch.no_grad()
def answer_logits_per_batch(
    model: Any,
    compressor: Compressor,
    batches: Sequence[Sequence[TaskPrompt]],
    mode: str = "question",
    new_cache: Callable[[], Any] | None = None,
) -> tuple[list[torch.Tensor], list[float]]:
    """:func:`answer_logits` of several batches, compressing each distinct head batch once.

    Batches whose heads are the same row by row (in mode ``question``: the same contexts, in the
    same order, asked questions of different kinds) share one compressed prefill; each asks its
    tails on a :func:`~kvpress_mm.fork_cache` of it - exactly what a prefill of its own would
    give, at a quarter of the prefills for the four task kinds. Each batch's prompts must share
    one task kind. ``new_cache``: as in :func:`answer_logits`.

    Returns:
        The logits ``[B, vocab]`` of each batch and the mean kept fraction of its prefill.

    """
    logits: list[torch.Tensor] = [torch.empty(0)] * len(batches)
    kept: list[float] = [0.0] * len(batches)
    pending = list(range(len(batches)))
    with compressor(model) as session:
        while pending:
            heads = _heads(batches[pending[0]], mode)
            sharing = [i for i in pending if _heads(batches[i], mode) == heads]
            cache, mask = _prefill_heads(model, batches[pending[0]], mode, new_cache)
            kept_fraction = sum(session.report.n_keep) / max(1, sum(session.report.prompt_lengths))
            for i in sharing:
                logits[i] = _ask_tails(model, fork_cache(cache), mask, batches[i], mode)
                kept[i] = kept_fraction
            pending = [i for i in pending if i not in sharing]
    return logits, kept


def _heads(prompts: Sequence[TaskPrompt], mode: str) -> list[tuple[list[str], Any]]:
    """What a batch prefills: each row's head words and images."""
    return [(split_prompt(p, mode)[0], p.images) for p in prompts]


def _prefill_heads(
    model: Any, prompts: Sequence[TaskPrompt], mode: str, new_cache: Callable[[], Any] | None
) -> tuple[Any, torch.Tensor]:
    """Prefill the batch's left-padded heads (compressed by the active session): the cache and the heads' mask."""
    head_ids = [encode_words(split_prompt(p, mode)[0]) for p in prompts]
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
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=head_positions.to(device),
        pixel_values=images.to(device),
        use_cache=True,
        **({} if new_cache is None else {"cache": new_cache()}),
    )
    return out.cache, mask


def _ask_tails(
    model: Any, cache: Any, head_mask: torch.Tensor, prompts: Sequence[TaskPrompt], mode: str
) -> torch.Tensor:
    """The last tail position's logits ``[B, vocab]`` (float32, on the CPU), the tails run on ``cache``."""
    tails = [split_prompt(p, mode)[1] for p in prompts]
    if len({len(t) for t in tails}) != 1:
        raise ValueError("the prompts of one batch must have tails of one length (one task kind)")
    ids = word_ids()
    tail_ids = torch.tensor([[ids[w] for w in t] for t in tails])  # [B, T]
    n_tail = tail_ids.shape[1]
    full_mask = torch.cat([head_mask, torch.ones_like(tail_ids)], dim=1)
    positions = head_mask.sum(-1, keepdim=True) + torch.arange(n_tail)[None]  # continue each row's positions
    device = next(model.parameters()).device
    logits = model(
        input_ids=tail_ids.to(device),
        attention_mask=full_mask.to(device),
        position_ids=positions.to(device),
        cache=cache,
        use_cache=True,
    ).logits[:, -1]
    return logits.float().cpu()


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
