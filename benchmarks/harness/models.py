"""The random models and prompts of the benchmarks, and their shape's command-line options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import argparse

    import torch

#: Special token ids of the random models: padding, beginning and end of sequence.
PAD, BOS, EOS = 0, 1, 2


class ModelShape(Protocol):
    """The text model's shape, as every benchmark's ``Config`` holds it.

    Read-only ints (properties, so that frozen dataclasses match): vocabulary size, hidden size,
    MLP size, decoder layers, query heads, key-value heads.
    """

    @property
    def vocab(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @property
    def intermediate(self) -> int: ...
    @property
    def layers(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def kv_heads(self) -> int: ...


#: The options of :func:`add_model_arguments`, in the order ``--help`` lists them.
MODEL_SHAPE_FIELDS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")


def llama_config(shape: ModelShape, max_positions: int) -> Any:
    """The ``transformers.LlamaConfig`` of ``shape`` (pad, BOS and EOS ids 0, 1, 2), ``max_positions`` long."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def random_llama(shape: ModelShape, max_positions: int, seed: int) -> Any:
    """A float32 ``LlamaForCausalLM`` of ``shape`` with random weights, deterministic in ``seed``, in eval mode."""
    import torch
    import transformers

    model_config = llama_config(shape, max_positions)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(model_config).float().eval()


def never_stop_early(model: Any) -> Any:
    """``model`` with no EOS token, so that ``generate`` always produces the tokens asked for; returns it."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def random_prompt(vocab: int, length: int, seed: int) -> torch.Tensor:
    """``[1, length]`` random token ids (no special ids), BOS first, deterministic in ``seed``."""
    import torch

    generator = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(3, vocab, (1, length), generator=generator)
    ids[0, 0] = BOS
    return ids


def load_saved(model_dir: Path, prompt: Path, attn: str) -> tuple[Any, torch.Tensor]:
    """A model saved with ``save_pretrained`` (float32, attention ``attn``) and a prompt saved as a JSON list of ids."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, attn_implementation=attn, dtype=torch.float32
    ).eval()
    return never_stop_early(model), torch.tensor([json.loads(prompt.read_text())])


def add_model_arguments(parser: argparse.ArgumentParser, defaults: ModelShape | None) -> None:
    """``--hidden``, ``--intermediate``, ``--layers``, ``--heads``, ``--kv-heads``, ``--vocab`` (ints).

    Their defaults come from ``defaults``; with ``None`` they default to ``None`` (decode: an
    option given overrides its ``--quick`` or full-run value, one not given keeps it).
    """
    for name in MODEL_SHAPE_FIELDS:
        default = None if defaults is None else getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)
