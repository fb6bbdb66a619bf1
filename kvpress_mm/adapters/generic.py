"""The generic adapter: text-only decoder LMs (Llama, Mistral, Qwen2, Qwen3, ...)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kvpress_mm.adapters.base import ModelAdapter
from kvpress_mm.hookspecs import hookimpl


class TextDecoderAdapter(ModelAdapter):
    """Any text-only decoder LM that uses transformers' attention interface.

    Claims a model whose config has no vision/audio sub-config, whose decoder
    (``model.get_decoder()``) has ``layers[i].self_attn`` modules with ``layer_idx``, and
    whose class dispatches attention through ``AttentionInterface``
    (``_supports_attention_backend``). Every position is text.
    """

    family = "text-only decoder LMs using transformers' attention interface (Llama, Mistral, Qwen2, Qwen3, ...)"

    def __init__(self, fallback: bool = False) -> None:
        # the built-in instance is a fallback (it claims any text decoder, so a plugin's adapter
        # for a text family must come first); a subclass from a plugin is not, unless it says so
        self.fallback = fallback

    def supports(self, model: nn.Module) -> bool:
        """Text-only, standard decoder layout, attention interface."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "sub_configs", None):
            return False
        if not getattr(model, "_supports_attention_backend", False):
            return False
        try:
            modules = self.attention_modules(model)
        except (AttributeError, TypeError):
            return False
        return bool(modules) and all(hasattr(m, "layer_idx") for m in modules)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """``model.get_decoder().layers[i].self_attn``."""
        decoder: Any = model.get_decoder() if hasattr(model, "get_decoder") else model  # type: ignore[operator]
        return [layer.self_attn for layer in decoder.layers]

    def attention_implementation(self, model: nn.Module) -> str:
        """``model.config._attn_implementation``."""
        config: Any = model.config
        return str(config._attn_implementation)

    def set_attention_implementation(self, model: nn.Module, implementation: str) -> None:
        """``model.set_attn_implementation(implementation)``."""
        model.set_attn_implementation(implementation)  # type: ignore[operator]


@hookimpl
def kvpress_mm_register_adapters(register: Any) -> None:
    """Register the generic text adapter."""
    register(TextDecoderAdapter(fallback=True))
