"""The error the commands raise for unusable input: printed as one line, exit code 2."""

from __future__ import annotations

from kvpress_mm.errors import KVPressMMError


class UsageError(KVPressMMError, ValueError):
    """A command's input is unusable (a missing model directory, an unreadable image or data file)."""
