"""Test-only strategies that re-plan a whole cache, before (and beside) the wrappers that do it for real.

:func:`chunked` gives any strategy a ``prefill_chunk_size``: the session then feeds its prefill in
chunks and plans every layer after each (what the ``chunked-prefill`` wrapper asks for).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, create_model

from kvpress_mm import Compressor


def chunked(strategy: Compressor, chunk_size: int) -> Compressor:
    """``strategy`` with a ``prefill_chunk_size`` field (a subclass made for the test): its prefills go in chunks."""
    cls: Any = create_model(  # type: ignore[call-overload]
        "Chunked" + type(strategy).__name__,
        __base__=type(strategy),
        prefill_chunk_size=(int, Field(default=chunk_size, ge=1)),
    )
    return cls(**strategy.model_dump())  # type: ignore[no-any-return]
