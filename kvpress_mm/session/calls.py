"""What each model call brings, and the checks that refuse calls that would go wrong under compression.

A call on an empty cache is a *prefill*: its prompt is compressed layer by layer
(:func:`prefill_call` builds its modality map and budgets). A call on a compressed cache
*continues* it (:func:`continuation_call`): it must bring only tokens the cache has not seen,
with the 2-D attention mask of the whole conversation (or explicit positions), because the
compressed cache is shorter than the conversation and anything derived from its length would be
silently wrong.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvpress_mm.adapters.base import ModelAdapter
from kvpress_mm.errors import InvalidInputError
from kvpress_mm.modality import Modality
from kvpress_mm.session.state import CacheState


def refuse_chunked_prefill(model: nn.Module) -> Callable[[], None] | None:
    """Make ``generate(prefill_chunk_size=...)`` raise before its first chunk reaches the model.

    transformers' chunked prefill feeds the prompt to the model in pieces; each piece looks
    like a call that continues a cache, so compression would keep ``int(chunk * (1 - r))``
    entries of the first piece and append the others in full. Returns the undo function.
    """
    original = getattr(model, "_prefill", None)
    if not callable(original):
        return None
    own = vars(model).get("_prefill")
    parameters = list(inspect.signature(original).parameters)

    def _prefill(*args: Any, **kwargs: Any) -> Any:
        config = {**dict(zip(parameters, args)), **kwargs}.get("generation_config")
        chunk = getattr(config, "prefill_chunk_size", None)
        if chunk is not None:
            raise InvalidInputError(
                f"chunked prefill is not supported under compression: drop prefill_chunk_size (it is {chunk}; "
                "pass prefill_chunk_size=None to generate, or unset it in the generation config). To prefill "
                "in chunks with compression after each, use the chunked-prefill wrapper: "
                "Compressor.from_name('chunked-prefill', inner=..., chunk_size=...)"
            )
        return original(*args, **kwargs)

    object.__setattr__(model, "_prefill", _prefill)

    def undo() -> None:
        if vars(model).get("_prefill") is _prefill:
            if own is None:
                object.__delattr__(model, "_prefill")
            else:
                object.__setattr__(model, "_prefill", own)

    return undo


@dataclass
class CallInfo:
    """One model call, as seen by the model pre-hook."""

    prefill: bool
    q_len: int
    new_valid: torch.Tensor  # [B, q] bool: which new tokens are real
    modality: torch.Tensor | None = None  # [B, P] int8 at prefill
    n_keep: tuple[int, ...] = ()
    prompt_record: dict[str, Any] = field(default_factory=dict)  # ModelAdapter.record_prompt at prefill
    # shared by the views of every layer of this prefill call (LayerView.call_state)
    strategy_state: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Rows of the call."""
        return int(self.new_valid.shape[0])

    @property
    def new_all_valid(self) -> bool:
        """True when every new token is real (computed once per call)."""
        if not hasattr(self, "_new_all_valid"):
            self._new_all_valid = bool(self.new_valid.all())
        return self._new_all_valid


def first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any], name: str) -> torch.Tensor | None:
    """The call's tensor argument ``name`` (``input_ids`` may also come first positionally), or ``None``."""
    value = kwargs.get(name)
    if value is None and name == "input_ids" and args and isinstance(args[0], torch.Tensor):
        value = args[0]
    return value if isinstance(value, torch.Tensor) else None


def check_left_padding(modality: torch.Tensor) -> None:
    """Refuse rows that are all padding, and padding after a real token (generate pads on the left)."""
    real = modality != Modality.PADDING
    if not bool(real.any(-1).all()):
        raise InvalidInputError("a row of the batch is all padding; remove it or give it at least one token")
    # once a row has a real token, it must not have padding after it
    seen_real = real.long().cumsum(-1) > 0
    if bool((seen_real & ~real).any()):
        raise InvalidInputError(
            "padding after real tokens (right or middle padding) is not supported under compression: "
            "pad on the left (tokenizer.padding_side = 'left'), as generate expects"
        )


def check_continuation_positions(state: CacheState, position_ids: torch.Tensor, q_len: int) -> None:
    """Refuse a call on a compressed cache whose first new token is not where the conversation stands.

    Catches ``generate(full_history, cache=compressed)``: generate slices the history at the
    (shorter) cache length and re-feeds tokens the cache has already seen.
    """
    expected = state.next_positions
    text = position_ids[0] if position_ids.dim() == 3 and position_ids.shape[0] == 4 else position_ids
    if expected is None or text.dim() != 2 or text.shape[-1] != q_len or text.shape[0] not in (1, expected.shape[0]):
        return  # multimodal RoPE positions, or shapes we cannot compare
    first = text[:, 0].to(expected.device).expand_as(expected)
    # positions counted over real tokens (generate), or over mask columns (a plain forward without a mask)
    if bool(((first == expected) | (first == state.seen_columns)).all()):
        return
    raise InvalidInputError(
        f"this compressed cache continues at position(s) {expected.tolist()}, but the call's first new token "
        f"is at {first.tolist()}. To continue on a compressed cache, pass only the tokens it has not seen as "
        "input_ids, with the attention_mask of the whole conversation"
    )


def call_tokens(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The call's ``input_ids`` (or ``inputs_embeds``) and its inputs as keywords.

    Raises:
        InvalidInputError: the call has no tokens, or 0 of them.

    """
    tokens = first_tensor(args, kwargs, "input_ids")
    if tokens is None:
        tokens = first_tensor(args, kwargs, "inputs_embeds")
    if tokens is None:
        raise InvalidInputError("the model call has neither input_ids nor inputs_embeds")
    if int(tokens.shape[1]) == 0:
        raise InvalidInputError("empty prompt: the model call has 0 tokens")
    inputs = dict(kwargs)
    if "input_ids" not in inputs and args and isinstance(args[0], torch.Tensor):
        inputs["input_ids"] = args[0]
    return tokens, inputs


def prefill_call(
    adapter: ModelAdapter,
    model: nn.Module,
    inputs: Mapping[str, Any],
    tokens: torch.Tensor,
    budgets: Callable[[torch.Tensor], tuple[int, ...]],
) -> CallInfo:
    """A prefill call's modality map, budgets and prompt record, after the adapter's input checks.

    ``budgets`` maps the modality map ``[batch, seq]`` to each row's ``n_keep`` (the strategy's
    :meth:`~kvpress_mm.Compressor.budgets`).
    """
    q_len = int(tokens.shape[1])
    adapter.validate_inputs(model, inputs)
    modality = adapter.modality_map(model, inputs, q_len).to(tokens.device)
    check_left_padding(modality)
    n_keep = tuple(int(n) for n in budgets(modality))
    record = adapter.record_prompt(model, inputs)
    return CallInfo(True, q_len, modality != Modality.PADDING, modality, n_keep, record)


def continuation_call(
    adapter: ModelAdapter,
    model: nn.Module,
    inputs: Mapping[str, Any],
    tokens: torch.Tensor,
    state: CacheState,
) -> CallInfo:
    """Check a call on a compressed cache, advance the cache's state past its tokens, and describe it.

    Raises:
        InvalidInputError: the call re-feeds tokens the cache has seen, has a mask of the wrong
            width or a custom 4-D mask, or gives no way to know its positions.

    """
    q_len = int(tokens.shape[1])
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        if mask.dim() != 2:
            raise InvalidInputError("custom 4-D attention masks are not supported on a compressed cache")
        if mask.shape[1] != state.seen_columns + q_len:
            raise InvalidInputError(
                f"this compressed cache has seen {state.seen_columns} positions (it holds fewer entries), "
                f"but the call brings {q_len} tokens with an attention_mask of {mask.shape[1]} columns. "
                "To continue on a compressed cache, pass only the tokens it has not seen as input_ids, "
                "with the attention_mask of the whole conversation"
            )
        new_valid = mask[:, -q_len:].to(device=tokens.device, dtype=torch.bool)
    else:
        if inputs.get("position_ids") is None:
            raise InvalidInputError(
                "a call on a compressed cache needs the 2-D attention_mask of the whole conversation or "
                "explicit position_ids: positions derived from the (shorter) cache length would be wrong"
            )
        new_valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    if state.next_positions is not None:
        adapter.validate_continuation(model, inputs, state.prompt_record, state.next_positions, new_valid)
    if not isinstance(mask, torch.Tensor):
        # generate drops an all-ones attention_mask and passes position_ids instead
        check_continuation_positions(state, inputs["position_ids"], q_len)
    state.seen_columns += q_len
    if state.next_positions is not None:
        state.next_positions = state.next_positions + new_valid.sum(-1).to(state.next_positions.device)
    return CallInfo(False, q_len, new_valid)
