"""Model adapters: one file per model family. They know models; strategies know tensors."""

from kvpress_mm.adapters.base import ModelAdapter

__all__ = ["ModelAdapter"]
