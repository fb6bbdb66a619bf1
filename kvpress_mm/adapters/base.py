"""The adapter interface and automatic adapter selection."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from kvpress_mm.errors import InvalidInputError
from kvpress_mm.modality import Modality


class ModelAdapter(ABC):
    """Knows one model family: where its text decoder's attention lives and what its tokens are.

    Register one from a plugin with ``register(MyAdapter())`` in
    ``kvpress_mm_register_adapters``. Adapters from plugins are tried before the built-ins.
    """

    #: Human-readable family name, shown in "supported families" errors.
    family: str = "unnamed family"
    #: A fallback is tried after every other adapter, built-in or plugin (the built-in generic text
    #: adapter is one: it claims any text decoder, so a family's own adapter must come first).
    fallback: bool = False

    @abstractmethod
    def supports(self, model: nn.Module) -> bool:
        """True if this adapter handles ``model``."""

    @abstractmethod
    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The text decoder's self-attention modules, in layer order (each has ``layer_idx``)."""

    @abstractmethod
    def set_attention_implementation(self, model: nn.Module, implementation: str) -> None:
        """Switch the text decoder (only) to the attention implementation ``implementation``."""

    @abstractmethod
    def attention_implementation(self, model: nn.Module) -> str:
        """The text decoder's current attention implementation name."""

    def modality_map(self, model: nn.Module, inputs: Mapping[str, Any], seq_len: int) -> torch.Tensor:
        """``[batch, seq]`` int8 :class:`~kvpress_mm.Modality` codes of a prefill call's positions.

        The default marks every position as text, except padding (``attention_mask == 0``).
        """
        return padding_aware_text_map(inputs, seq_len)

    def validate_inputs(self, model: nn.Module, inputs: Mapping[str, Any]) -> None:
        """Raise :class:`~kvpress_mm.errors.InvalidInputError` for inputs that would go wrong."""

    def instrument(self, model: nn.Module) -> Callable[[], None] | None:
        """Family-specific checks installed for a compressing session's lifetime.

        Returns the function that removes them (called when the session exits), or ``None``.
        The default installs nothing.
        """
        return None

    def text_decoder(self, model: nn.Module) -> nn.Module:
        """The text decoder: the module whose ``layers`` hold :meth:`attention_modules` (``model.get_decoder()``).

        A chunked prefill splits this module's call (the vision tower and the input embeddings
        run once, on the whole prompt).
        """
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        return decoder if isinstance(decoder, nn.Module) else model

    def split_decoder_inputs(self, model: nn.Module, inputs: Mapping[str, Any], start: int, end: int) -> dict[str, Any]:
        """The family's own per-position inputs of the text decoder, for positions ``start .. end - 1``.

        A chunked prefill feeds the text decoder one chunk of the prompt at a time; the session
        splits the inputs every decoder takes (token ids or embeddings, the 2-D attention mask,
        positions, multimodal RoPE positions included). A family whose decoder takes more
        per-position inputs (Qwen3-VL's deepstack features) returns their chunk here, keyed by
        argument name. The default: none.
        """
        return {}

    def record_prompt(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """What to remember about a prompt that gets compressed, for later calls on its cache.

        Called at the prefill, after :meth:`validate_inputs`; the result is handed to
        :meth:`validate_continuation`. The default remembers nothing.

        Per-row values must be batch-first: tensors whose first dimension is the batch, or lists
        and tuples with one item per row. When the cache's rows are reordered (beam search's
        ``reorder_cache``), exactly those values are reordered alike; anything else is taken to
        be shared by all rows.
        """
        return {}

    def validate_continuation(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        record: Mapping[str, Any],
        next_positions: torch.Tensor,
        new_valid: torch.Tensor,
    ) -> None:
        """Raise :class:`~kvpress_mm.errors.InvalidInputError` for a call on a compressed cache that would go wrong.

        Args:
            model: the model.
            inputs: the call's keyword inputs.
            record: what :meth:`record_prompt` returned for the cache's prompt.
            next_positions: ``[batch]`` the text position of each row's next real token.
            new_valid: ``[batch, q]`` bool, which of the call's tokens are real.

        """


def _batch_size(inputs: Mapping[str, Any]) -> int:
    for name in ("input_ids", "inputs_embeds"):
        tensor = inputs.get(name)
        if isinstance(tensor, torch.Tensor):
            return int(tensor.shape[0])
    raise InvalidInputError("the model call has neither input_ids nor inputs_embeds")


def padding_aware_text_map(inputs: Mapping[str, Any], seq_len: int) -> torch.Tensor:
    """Everything text, padding where the 2-D ``attention_mask`` is 0."""
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        if mask.dim() != 2 or mask.shape[-1] != seq_len:
            raise InvalidInputError(
                f"expected a 2-D attention_mask [batch, {seq_len}] for the prompt, got shape {tuple(mask.shape)}; "
                "custom 4-D masks are not supported under compression"
            )
        modality = torch.full(mask.shape, int(Modality.TEXT), dtype=torch.int8, device=mask.device)
        return modality.masked_fill(mask == 0, int(Modality.PADDING))
    batch = _batch_size(inputs)
    return torch.full((batch, seq_len), int(Modality.TEXT), dtype=torch.int8)
