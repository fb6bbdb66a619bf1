"""The arms of kvpress_compare (what each side runs) and the settings of one run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.decode.arms import Config as DecodeConfig

DECODE_DEFAULTS = DecodeConfig()


@dataclass(frozen=True)
class Pair:
    """One arm: what each side runs."""

    name: str
    ours: dict[str, Any] | None  # {"strategy": ..., config...}; {} = no compressor; None = not run
    kvpress: dict[str, Any] | None  # {"press": ..., "settings": {...}, "attn": ...}; None = not run
    compare_kept: bool = False


def pairs(ratio: float) -> list[Pair]:
    """The arms, with each side's settings (kvpress's SnapKV defaults: window 64, kernel 5, avg pooling)."""
    return [
        Pair("baseline", {}, {"press": "none", "settings": {}, "attn": "sdpa"}),
        Pair(
            "snapkv",
            {"strategy": "snapkv", "compression_ratio": ratio, "window_size": 64, "kernel_size": 5, "pooling": "avg"},
            {"press": "snapkv", "settings": {"window_size": 64, "kernel_size": 5}, "attn": "sdpa"},
            compare_kept=True,
        ),
        Pair(
            "streaming",
            {"strategy": "streaming", "compression_ratio": ratio, "sink_tokens": 4},
            {"press": "streaming", "settings": {"n_sink": 4}, "attn": "sdpa"},
            compare_kept=True,
        ),
        Pair(
            "h2o",
            {"strategy": "h2o", "compression_ratio": ratio, "decode_eviction": False, "window_size": 0},
            {"press": "observed-attention", "settings": {}, "attn": "eager"},
        ),
        Pair("baseline-eager", None, {"press": "none", "settings": {}, "attn": "eager"}),
    ]


@dataclass(frozen=True)
class Config:
    """The model, prompt and run settings."""

    length: int = 8192
    ratio: float = 0.8
    decode_tokens: int = 32
    repeats: int = 1
    # the model: by default the decode benchmark's text model
    hidden: int = DECODE_DEFAULTS.hidden
    intermediate: int = DECODE_DEFAULTS.intermediate
    layers: int = DECODE_DEFAULTS.layers
    heads: int = DECODE_DEFAULTS.heads
    kv_heads: int = DECODE_DEFAULTS.kv_heads
    vocab: int = DECODE_DEFAULTS.vocab
    threads: int | None = None
    seed: int = 0
    arms: tuple[str, ...] = ("baseline", "snapkv", "streaming", "h2o", "baseline-eager")
