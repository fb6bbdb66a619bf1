"""Test-only strategies that re-plan a whole cache, beside the wrappers that do it for real.

:func:`chunked` gives any strategy a ``prefill_chunk_size``: the session then feeds its prefill in
chunks and plans every layer after each (what ``chunked-prefill`` asks for), with no wrapper in
between, so that the session's mechanism is tested on its own.
"""

from __future__ import annotations

from typing import Any

from kvpress_mm import Compressor


def chunked(strategy: Compressor, chunk_size: int) -> Compressor:
    """``strategy`` whose prefills go in chunks of ``chunk_size`` (an instance of a subclass made for the test)."""
    base: Any = type(strategy)

    class Chunked(base):  # type: ignore[misc,valid-type]
        @property
        def prefill_chunk_size(self) -> int | None:
            return chunk_size

    Chunked.__name__ = "Chunked" + base.__name__
    return Chunked(**dict(strategy))  # type: ignore[no-any-return]
