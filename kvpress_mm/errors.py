"""Exceptions raised by kvpress-mm. Every one names the problem and how to fix it."""

from __future__ import annotations


class KVPressMMError(Exception):
    """Base class of every kvpress-mm error."""


class UnknownStrategyError(KVPressMMError, ValueError):
    """A strategy name that no built-in or plugin registered."""


class DuplicateStrategyError(KVPressMMError, ValueError):
    """Two registrations (built-in or plugin) claim the same strategy name."""


class UnsupportedModelError(KVPressMMError, ValueError):
    """No adapter claims the model, or the model is used in a way compression cannot support."""


class UnsupportedCacheError(KVPressMMError, ValueError):
    """The KV cache passed to the model cannot be compressed (static, offloaded...), or not this way."""


class MissingDependencyError(KVPressMMError, ImportError):
    """An optional dependency a feature needs is not installed; the message names the extra to install.

    For example ``generate(cache_implementation="quantized")`` with the quanto or HQQ backend
    needs ``pip install 'kvpress-mm[quant]'``.
    """


class InvalidInputError(KVPressMMError, ValueError):
    """The model call's inputs would give a silently wrong answer under compression."""


class InvalidPlanError(KVPressMMError, RuntimeError):
    """A strategy returned scores or a plan that breaks the framework's contract."""


class CompressorAlreadyActiveError(KVPressMMError, RuntimeError):
    """A compressor session is already active on this model."""


class MissingCheckpointError(KVPressMMError, FileNotFoundError):
    """The reference model's checkpoint directory holds no weights (``model.safetensors``).

    The message says how to train one: ``python -m kvpress_mm.apps.reference.train --out DIR``
    (see the reference-model page of the docs).
    """


class UsageError(KVPressMMError, ValueError):
    """A command's input is unusable (a missing model directory, an unreadable image or data file).

    The commands print it as one line and exit with code 2.
    """
