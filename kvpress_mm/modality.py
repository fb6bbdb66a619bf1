"""Modality codes for prompt positions: what each cache entry came from."""

from __future__ import annotations

from enum import IntEnum


class Modality(IntEnum):
    """What a prompt position carries. Stored as ``int8`` in modality maps ``[batch, seq]``.

    Vision delimiters (``<vision_start>``, ``<img>``, ...) are ``TEXT``: only the placeholder
    positions that carry image or video features are ``IMAGE`` / ``VIDEO``.
    """

    TEXT = 0
    IMAGE = 1
    VIDEO = 2
    PADDING = 3
