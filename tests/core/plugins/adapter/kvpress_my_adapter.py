"""A plugin that registers a model adapter (here: Llama models, claimed before the built-in)."""

from typing import Any

from torch import nn

from kvpress_mm import hookimpl
from kvpress_mm.adapters.generic import TextDecoderAdapter


class MyLlamaAdapter(TextDecoderAdapter):
    """The generic text adapter, restricted to Llama models, under its own family name."""

    family = "my-llama (kvpress-my-adapter test plugin)"

    def supports(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) == "llama" and super().supports(model)


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    register(MyLlamaAdapter())
