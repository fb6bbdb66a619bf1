"""The settings of a decode run and its arms: what every part (grid, length sweep, cache arms) measures."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from kvpress_mm.strategies import BUILTIN_STRATEGIES

FULL = "full"
# the grid's strategies: every built-in but full, the no-op, which the grid runs once as its baseline
ALL_STRATEGIES = tuple(name for name in BUILTIN_STRATEGIES if name != FULL)
NATIVE = "native-K"


@dataclass(frozen=True)
class Config:
    """The model, the prompts and the parts of one run."""

    hidden: int = 1024
    intermediate: int = 2816
    layers: int = 8
    heads: int = 16
    kv_heads: int = 16
    vocab: int = 4096
    image_fraction: float = 0.8
    image_tokens: int = 576  # placeholders per image (LLaVA-1.5's 24 x 24)
    decode_tokens: int = 64
    # decode steps per arm and turn (the arms take turns): one, so that a disturbance of the machine
    # (they last about 0.5 s here) falls on several arms rather than on one arm's consecutive steps
    decode_burst: int = 1
    repeats: int = 1
    grid_length: int = 4096
    grid_ratios: tuple[float, ...] = (0.5, 0.8, 0.9)
    grid_strategies: tuple[str, ...] = ALL_STRATEGIES
    sweep_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    sweep_ratio: float = 0.8
    sweep_strategies: tuple[str, ...] = ("lookm-pivotal", "snapkv")
    # added at the longest sweep length only, for their prefill overhead (h2o: the other 1.3x strategy family)
    overhead_strategies: tuple[str, ...] = ("h2o",)
    cache_length: int = 8192
    cache_strategy: str = "snapkv"  # decode cost depends on the cache size only: the cheapest prefill
    # the ragged part, at cache_length and sweep_ratio: this strategy (per-head budgets: ragged storage)
    # against its rectangular inner strategy (adakv's default inner is snapkv, as configured here)
    ragged_strategy: str = "adakv"
    ragged_baseline: str = "snapkv"
    threads: int | None = None
    seed: int = 0

    @property
    def image_token_id(self) -> int:
        """The image placeholder id (a real row of the embedding, below the vocabulary size)."""
        return self.vocab - 2

    @property
    def max_length(self) -> int:
        """Longest prompt of the run."""
        return max(self.grid_length, self.cache_length, *self.sweep_lengths)

    def to_json(self) -> str:
        """This config as JSON (tuples become lists), for a worker process."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Config:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        for name, value in data.items():
            if isinstance(value, list):
                data[name] = tuple(value)
        return cls(**data)


QUICK = dict(
    decode_tokens=32,
    grid_length=1024,
    sweep_lengths=(512, 1024, 2048, 4096),
    cache_length=4096,
)


@dataclass(frozen=True)
class Arm:
    """One measured configuration: a prompt length, a strategy (or none) and a cache class."""

    strategy: str  # a registered strategy, or NATIVE (no compressor)
    ratio: float  # the compression ratio (for NATIVE: the ratio whose budget K it stands for)
    length: int  # L: the prompt length compressed (for NATIVE: the L it stands for)
    cache: str = "growing"  # "stock" (DynamicLayer) or "growing" (GrowingLayer)

    @property
    def prompt_length(self) -> int:
        """Tokens of the prompt actually fed: L, or K for native-K."""
        if self.strategy == NATIVE:
            from kvpress_mm.ops.budget import n_keep_for

            return n_keep_for(self.length, self.ratio)
        return self.length

    @property
    def key(self) -> str:
        """A unique, readable name."""
        ratio = "" if self.strategy == FULL else f" r={self.ratio:g}"
        return f"L={self.length} {self.strategy}{ratio} {self.cache}"

    @property
    def derived_from(self) -> Arm | None:
        """For an uncompressed growing arm: the stock arm whose cache it copies (no prefill of its own)."""
        if self.cache == "growing" and self.strategy in (FULL, NATIVE):
            return replace(self, cache="stock")
        return None

    def compressor(self) -> Any:
        """The arm's kvpress-mm compressor; None for native-K and the uncompressed growing arms."""
        from kvpress_mm.apps.run import compressor_from_spec

        if self.strategy == NATIVE or self.derived_from is not None:
            return None
        return compressor_from_spec(self.strategy, self.ratio)  # a name or a wrapper spec (pyramid:snapkv)


def grid_arms(config: Config) -> list[Arm]:
    """The grid: ``full`` once, then every strategy at every ratio, at ``grid_length``."""
    grid = [Arm(FULL, 0.0, config.grid_length, "stock")]
    return grid + [Arm(s, r, config.grid_length) for s in config.grid_strategies for r in config.grid_ratios]


def sweep_arms(config: Config) -> list[Arm]:
    """The length sweep: at every length ``full``, the sweep strategies and native-K (stock and growing); the
    overhead strategies at the longest length only."""
    sweep = []
    for length in config.sweep_lengths:
        sweep.append(Arm(FULL, 0.0, length, "stock"))
        sweep += [Arm(s, config.sweep_ratio, length) for s in config.sweep_strategies]
        sweep += [Arm(NATIVE, config.sweep_ratio, length, "stock"), Arm(NATIVE, config.sweep_ratio, length, "growing")]
    longest = max(config.sweep_lengths)
    return sweep + [
        Arm(s, config.sweep_ratio, longest) for s in config.overhead_strategies if s not in config.sweep_strategies
    ]


def cache_arms(config: Config) -> list[Arm]:
    """The cache arms at ``cache_length``: full, the cache strategy and native-K, each on either cache class."""
    length, ratio = config.cache_length, config.sweep_ratio
    return [
        Arm(FULL, 0.0, length, "stock"),
        Arm(FULL, 0.0, length, "growing"),
        Arm(config.cache_strategy, ratio, length, "stock"),
        Arm(config.cache_strategy, ratio, length, "growing"),
        Arm(NATIVE, ratio, length, "stock"),
        Arm(NATIVE, ratio, length, "growing"),
    ]


def ragged_arms(config: Config) -> list[Arm]:
    """The ragged part at ``cache_length``: full, the rectangular baseline and the ragged strategy (growing caches)."""
    length, ratio = config.cache_length, config.sweep_ratio
    return [
        Arm(FULL, 0.0, length, "stock"),
        Arm(config.ragged_baseline, ratio, length),
        Arm(config.ragged_strategy, ratio, length),
    ]


def plan_arms(config: Config) -> dict[str, list[Arm]]:
    """The arms of every part (an arm may serve several parts; it runs once)."""
    return {
        "grid": grid_arms(config),
        "sweep": sweep_arms(config),
        "caches": cache_arms(config),
        "ragged": ragged_arms(config),
    }


def unique_arms(parts: dict[str, list[Arm]]) -> list[Arm]:
    """Every arm once: shortest prompts first, ``full`` before the compressed arms of its length, stock first."""
    seen: dict[str, Arm] = {}
    for arms in parts.values():
        for arm in arms:
            seen.setdefault(arm.key, arm)
    return sorted(
        seen.values(),
        key=lambda a: (a.prompt_length, a.length, a.strategy != FULL, a.strategy, a.ratio, a.cache != "stock"),
    )


def groups_of(arms: list[Arm]) -> dict[int, list[Arm]]:
    """Arms by prompt length ``L`` (native-K arms with the ``L`` they stand for): one process each."""
    groups: dict[int, list[Arm]] = {}
    for arm in arms:
        groups.setdefault(arm.length, []).append(arm)
    return dict(sorted(groups.items()))
