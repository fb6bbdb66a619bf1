"""What the session changes in ``generate``'s own steps, on the model instance, while it is active.

A compressed cache holds fewer entries than the conversation has tokens, and ``generate`` reads
its length in a few places. Two of its methods are stood in for on the model *instance* (never
the class) for the session's lifetime, each calling the original:

- ``_prefill`` (the first model call of every ``generate``): refuses chunked prefill, refuses a
  compressed *assistant* whose strategy cannot be rolled back, marks an assistant's calls
  (:class:`Drafting`: transformers never gives an assistant the images, so its image
  placeholders come without pixels), and, when the call continues a compressed cache with the
  whole conversation as ``input_ids`` (what an assistant model's ``generate`` does every round,
  and what users of plain transformers do), cuts the history at the columns the cache has seen
  instead of at its (shorter) length;
- ``_get_candidate_generator`` (the start of assisted decoding, before any model call): refuses
  strategies that cannot be rolled back, and keeps the first round free of drafts, so that the
  prefill compresses exactly the prompt, as in the same run without an assistant.

And, for every session (no-op strategies too), ``_prepare_cache_for_generation`` first checks
that a quantized cache's backend is installed (:func:`require_cache_backend`), so that the error
names the ``[quant]`` extra.

Rejected drafts are removed with ``cache.crop``, which the cache's state follows
(:class:`~kvpress_mm.session.state.FollowCrop`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kvpress_mm.cache.quantized import require_backend
from kvpress_mm.errors import InvalidInputError
from kvpress_mm.session.state import rollback_refusal, state_of


class Drafting:
    """Whether the model call in progress is an assistant model's prefill (set by the ``_prefill`` stand-in).

    An assistant drafts from the target's conversation, which ``generate`` re-feeds as token ids
    only: image placeholders reach it without pixels and are embedded as the placeholder
    token's text embedding (in plain transformers too). The session then skips the adapter's
    input checks, which would refuse placeholders without images in a user's call.
    """

    def __init__(self) -> None:
        self.active = False


def instrument_generate(model: nn.Module, strategy: Any, drafting: Drafting) -> Callable[[], None] | None:
    """Stand in for the model's ``_prefill`` and ``_get_candidate_generator``; returns the undo function."""
    stand_ins = (_stand_in_prefill(model, strategy, drafting), _stand_in_candidates(model, strategy))
    undos = [undo for undo in stand_ins if undo is not None]
    if not undos:
        return None

    def undo() -> None:
        for each in reversed(undos):
            each()

    return undo


def _set_on_instance(model: nn.Module, name: str, function: Callable[..., Any]) -> Callable[[], None]:
    """Set ``model.<name> = function`` on the instance (bypassing ``nn.Module``'s attribute logic); the undo."""
    own = vars(model).get(name)
    object.__setattr__(model, name, function)

    def undo() -> None:
        if vars(model).get(name) is function:
            if own is None:
                object.__delattr__(model, name)
            else:
                object.__setattr__(model, name, own)

    return undo


def require_cache_backend(model: nn.Module) -> Callable[[], None] | None:
    """Make ``generate(cache_implementation="quantized")`` name the ``[quant]`` extra when its backend is missing.

    Checked before ``generate`` builds the cache (transformers' own error names only the
    package). Returns the undo function, or ``None`` when the model has no such step.
    """
    original = getattr(model, "_prepare_cache_for_generation", None)
    if not callable(original):
        return None
    parameters = list(inspect.signature(original).parameters)

    def _prepare_cache_for_generation(*args: Any, **kwargs: Any) -> Any:
        require_backend({**dict(zip(parameters, args)), **kwargs}.get("generation_config"))
        return original(*args, **kwargs)

    return _set_on_instance(model, "_prepare_cache_for_generation", _prepare_cache_for_generation)


def whole_history_cut(input_ids: Any, model_kwargs: dict[str, Any], generation_config: Any) -> int | None:
    """Where to cut ``input_ids`` that repeat a compressed cache's conversation, or ``None`` to leave them.

    ``generate`` treats ``input_ids`` as the whole conversation when they are as long as the 2-D
    attention mask (or, with the mask dropped, as the mask it recorded), and then feeds the
    tokens after ``cache.get_seq_length()`` - on a compressed cache, tokens it has already seen.
    The right cut is at the columns the cache has seen. (An ``inputs_embeds`` continuation is
    left alone: the model pre-hook refuses it.)
    """
    state = state_of(model_kwargs.get("cache"))
    if state is None or not _is_whole_history(input_ids, model_kwargs, generation_config):
        return None
    return state.seen_columns if input_ids.shape[1] > state.seen_columns else None


def drop_rejected_drafts(input_ids: Any, model_kwargs: dict[str, Any], generation_config: Any) -> None:
    """Crop an assistant's compressed cache back to the accepted conversation, if it still holds rejected drafts.

    Each round, an assistant is re-fed the target's accepted tokens: the columns its cache saw
    beyond ``input_ids[:, :-1]`` are drafts the target rejected. transformers crops them before
    the call, but before 5.25 it measured how many with ``cache.get_seq_length()`` - the
    compressed length, so it crops too few (or none). Removing the rest here is what it meant.
    """
    cache: Any = model_kwargs.get("cache")
    state = state_of(cache)
    if state is None or not _is_whole_history(input_ids, model_kwargs, generation_config):
        return
    excess = state.seen_columns - (int(input_ids.shape[1]) - 1)
    if excess > 0:
        cache.crop(-excess)


def _is_whole_history(input_ids: Any, model_kwargs: dict[str, Any], generation_config: Any) -> bool:
    """``input_ids`` are as long as the conversation's mask: ``generate`` reads them as the whole conversation."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or model_kwargs.get("inputs_embeds") is not None:
        return False
    mask = model_kwargs.get("attention_mask")
    mask_length = mask.shape[1] if isinstance(mask, torch.Tensor) else getattr(generation_config, "_mask_length", -1)
    return bool(mask_length == input_ids.shape[1])


def _stand_in_prefill(model: nn.Module, strategy: Any, drafting: Drafting) -> Callable[[], None] | None:
    original = getattr(model, "_prefill", None)
    if not callable(original):
        return None
    parameters = list(inspect.signature(original).parameters)

    def _prefill(*args: Any, **kwargs: Any) -> Any:
        bound = {**dict(zip(parameters, args)), **kwargs}
        config = bound.get("generation_config")
        chunk = getattr(config, "prefill_chunk_size", None)
        if chunk is not None:
            raise InvalidInputError(
                f"chunked prefill is not supported under compression: drop prefill_chunk_size (it is {chunk}; "
                "pass prefill_chunk_size=None to generate, or unset it in the generation config). To prefill "
                "in chunks with compression after each, use the chunked-prefill wrapper: "
                "Compressor.from_name('chunked-prefill', inner=..., chunk_size=...)"
            )
        assistant = bool(getattr(config, "is_assistant", False))
        refusal = rollback_refusal(strategy)
        if assistant and refusal is not None:
            raise InvalidInputError(f"this assistant model cannot draft under compression: {refusal}")
        model_kwargs = bound.get("model_kwargs")
        if isinstance(model_kwargs, dict):
            if assistant:
                drop_rejected_drafts(bound.get("input_ids"), model_kwargs, config)
            cut = whole_history_cut(bound.get("input_ids"), model_kwargs, config)
            if cut is not None:
                bound["input_ids"] = bound["input_ids"][:, cut:]
        drafting.active = assistant
        try:
            return original(**bound)
        finally:
            drafting.active = False

    return _set_on_instance(model, "_prefill", _prefill)


def _stand_in_candidates(model: nn.Module, strategy: Any) -> Callable[[], None] | None:
    original = getattr(model, "_get_candidate_generator", None)
    if not callable(original):
        return None

    def _get_candidate_generator(*args: Any, **kwargs: Any) -> Any:
        refusal = rollback_refusal(strategy)
        if refusal is not None:
            raise InvalidInputError(f"assisted decoding is not supported with this strategy: {refusal}")
        generator = original(*args, **kwargs)
        get_candidates = getattr(generator, "get_candidates", None)
        if callable(get_candidates):
            generator.get_candidates = FirstRoundWithoutDrafts(get_candidates)
        return generator

    return _set_on_instance(model, "_get_candidate_generator", _get_candidate_generator)


class FirstRoundWithoutDrafts:
    """Stands in for a candidate generator's ``get_candidates``: no drafts in the first round.

    In its first round, assisted decoding feeds the prompt *and* the first drafts to the model
    in one call - the prefill. Compression would then see another prompt than the same run
    without an assistant (drafts in the budget, in the scoring window, maybe evicted). So the
    drafter still runs in the first round (it builds its own state: the assistant's cache,
    its drafted length), but the round verifies no drafts: the prefill is exactly the prompt
    and yields one token, as a plain run's does. Later rounds are untouched. Greedy tokens are
    those of the run without an assistant; the price is one round of speculation.
    """

    def __init__(self, get_candidates: Callable[..., Any]) -> None:
        self._get_candidates = get_candidates
        self._first = True

    def __call__(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The generator's candidates, except in the first round: the input alone, no draft logits."""
        candidates = self._get_candidates(input_ids, *args, **kwargs)
        if self._first:
            self._first = False
            return input_ids, None
        return candidates
