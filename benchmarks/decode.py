"""Compressed decoding against the full cache, the physical bound (native-K) and transformers' stock cache.

A benchmark, not a test: it measures and reports (PASS / MISS against the targets below), it
never fails on timings. Run it as

    .venv/bin/python benchmarks/decode.py --threads 1   # the whole run (about 25 minutes, one core)
    .venv/bin/python benchmarks/decode.py --quick       # shorter prompts (a few minutes)

The model is a random-weight ``LlavaForConditionalGeneration`` built from a config (nothing
downloaded): its text model is a Llama with hidden 1024, MLP 2816, 8 layers, 16 query heads and
16 KV heads (MHA, head_dim 64), vocabulary 4096, float32, ``sdpa``; a one-layer CLIP tower.
Prompts are 80% image placeholders (``config.image_token_id``, in images of up to 576
tokens between text segments, the prompt ending on text). The image features are passed
precomputed (``mm_encoder_outputs``, what ``generate`` computes from ``pixel_values``), which is
the same for the text decoder and skips the vision tower; the library's LLaVA adapter marks
the placeholders as image entries from ``input_ids``.

Arms (the same LLaVA, greedy decoding):

- the grid: every strategy at every ratio of ``--grid-ratios`` on the ``--grid-length`` prompt
  (``full``, the no-op strategy, once);
- the length sweep: ``full``, ``lookm-pivotal`` and ``snapkv`` at ratio ``--sweep-ratio`` and the
  **native-K** arm - a prompt of ``K = int(L * (1 - r))`` tokens from the start, no compressor:
  the cache a compressed arm holds, at no compression cost - the physical bound of decoding;
  ``--overhead-strategies`` (default ``h2o``) adds strategies at the longest length only (their
  prefill overhead);
- the cache arms at ``--cache-length``: ``full`` with transformers' ``DynamicLayer`` (which
  re-copies the whole cache at every decode step: ``torch.cat``) and with kvpress-mm's
  ``GrowingLayer`` (appends in place), a compressed strategy with either, native-K with either.

Compressed arms use the session's default (compressed layers become ``GrowingLayer`` s) unless
their cache is ``stock`` (``compressor(model, growing_cache=False)``). An uncompressed arm with
the growing cache (``full`` or native-K) is not prefilled again: its cache is the stock arm's
keys and values copied into ``GrowingLayer`` s (``GrowingLayer.from_tensors``), exactly what a
prefill into ``growing_dynamic_cache`` holds; only its decoding is measured.

One fresh Python process per prompt length ``L`` (native-K arms with the ``L`` they stand for;
``--isolation inline`` runs everything in this process). While prefilling, glibc's mmap threshold
is fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set and
RSS growth measures what a step needs; while decoding, at 32 MiB, the ceiling of glibc's dynamic
threshold, which a long-running process reaches (a stock cache's per-step ``torch.cat`` then
reuses heap memory below that size instead of faulting in fresh pages at every step).

- **prefills**, one arm after the other (``full`` before the compressed arms): a warm-up on a
  short prompt, then the measured prefill (``generate`` of one token): prefill time (start of
  ``generate`` to the first logits, compression included; wall and process CPU time),
  compression time (measured directly: the session's planning and cache surgery, summed over
  layers), the RSS high-water growth of the prefill and of each layer's compression step (the
  largest over layers; the kernel's high-water mark is reset first), KV bytes (held, and
  allocated including a growing layer's headroom). Each cache stays in memory;
- **decoding**: every arm of that length decodes ``--decode-tokens`` tokens greedily, one step
  (``--decode-burst``) at a time in turn, in a rotating order, so that the ms/token of arms compared with
  each other are measured under the same load (the machine is shared: load varies by the
  minute). Decode ms/token is the median step.

Compression overhead = prefill with compression / prefill of ``full`` at the same length (in the
same process, minutes apart): with ``--threads 1`` the ratio of process CPU times (immune to
time slices lost to other processes), else of wall times; the direct ratio
``1 + compression / (prefill - compression)`` is printed beside it.

Results: a table per part on stdout, JSON, and a PNG plot (decode ms/token against prompt
length, one line per arm of the sweep; beside it the peak memory of the compression step
against prompt length).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from bench_common import (
    BOS,
    MALLOC_ENV,
    MODEL_SHAPE_FIELDS,
    PAD,
    add_model_arguments,
    fmt,
    llama_config,
    machine_info,
    median_or_none,
    peak_rss_bytes,
    ratio_or_none,
    reset_peak_rss,
    rounded,
    rss_bytes,
)

from kvpress_mm.strategies import BUILTIN_STRATEGIES

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "decode.json"

FULL = "full"
# the grid's strategies: every built-in but full, the no-op, which the grid runs once as its baseline
ALL_STRATEGIES = tuple(name for name in BUILTIN_STRATEGIES if name != FULL)
NATIVE = "native-K"

# Targets of the issue.
NATIVE_TARGET = 1.10  # compressed decode ms/token / native-K decode ms/token, every sweep length
OVERHEAD_TARGETS = {  # (prefill + compression) / prefill at the longest sweep length
    "h2o": 1.3,
    "lookm-evict": 1.3,
    "lookm-average": 1.3,
    "lookm-pivotal": 1.3,
    "lookm-weighted": 1.3,
}
OVERHEAD_TARGET_OTHERS = 1.05
WALL_TARGET_MINUTES = 30.0  # the whole run
LINEAR_TOLERANCE = 1.25  # peak bytes per token at L over at L / 2: a [heads, L, L] term would double it
# glibc while prefilling: bench_common.MALLOC_ENV (allocations above 128 KiB are mmapped and returned on
# free); while decoding, the ceiling of glibc's dynamic threshold (32 MiB on 64-bit): what a long-running
# process converges to, so that a stock cache's per-step torch.cat reuses heap memory as it would in use
DECODE_MMAP_THRESHOLD = 32 * 2**20
PROGRESS = "@@progress "  # a worker's progress lines on stderr


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


def plan_arms(config: Config) -> dict[str, list[Arm]]:
    """The arms of every part (an arm may serve several parts; it runs once)."""
    grid = [Arm(FULL, 0.0, config.grid_length, "stock")]
    grid += [Arm(s, r, config.grid_length) for s in config.grid_strategies for r in config.grid_ratios]
    sweep = []
    for length in config.sweep_lengths:
        sweep.append(Arm(FULL, 0.0, length, "stock"))
        sweep += [Arm(s, config.sweep_ratio, length) for s in config.sweep_strategies]
        sweep += [Arm(NATIVE, config.sweep_ratio, length, "stock"), Arm(NATIVE, config.sweep_ratio, length, "growing")]
    longest = max(config.sweep_lengths)
    sweep += [
        Arm(s, config.sweep_ratio, longest) for s in config.overhead_strategies if s not in config.sweep_strategies
    ]
    length, ratio = config.cache_length, config.sweep_ratio
    caches = [
        Arm(FULL, 0.0, length, "stock"),
        Arm(FULL, 0.0, length, "growing"),
        Arm(config.cache_strategy, ratio, length, "stock"),
        Arm(config.cache_strategy, ratio, length, "growing"),
        Arm(NATIVE, ratio, length, "stock"),
        Arm(NATIVE, ratio, length, "growing"),
    ]
    return {"grid": grid, "sweep": sweep, "caches": caches}


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


# -- model and prompts -----------------------------------------------------------------------


def build_model(config: Config) -> Any:
    """The random float32 LLaVA of ``config`` (sdpa, no EOS so generation never stops early)."""
    import transformers

    transformers.logging.set_verbosity_error()
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    text = llama_config(config, config.max_length + config.decode_tokens + 16)
    model_config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=config.image_token_id,
        image_seq_length=config.image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(config.seed)
    model = transformers.LlavaForConditionalGeneration(model_config).float().eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


@dataclass
class Prompt:
    """A prompt: token ids ``[1, L]`` and the image features its placeholders stand for."""

    input_ids: torch.Tensor
    image_features: list[torch.Tensor]  # one [tokens, hidden] per image, in order

    def generate_kwargs(self) -> dict[str, Any]:
        """What ``generate`` needs besides the ids: the mask and the precomputed image features."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(self.input_ids)}
        if self.image_features:
            features: Any = self.image_features  # a list of [tokens, hidden], one per image
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        return kwargs


def make_prompt(config: Config, length: int) -> Prompt:
    """``length`` tokens, ``round(image_fraction * length)`` of them image placeholders, ending on text.

    Images of at most ``image_tokens`` placeholders alternate with text segments (BOS first);
    deterministic in ``config.seed`` and ``length``.
    """
    generator = torch.Generator().manual_seed(1000 + config.seed + length)
    n_image = min(length - 1, round(config.image_fraction * length))
    n_images = -(-n_image // config.image_tokens) if n_image else 0
    sizes = [n_image // n_images + (i < n_image % n_images) for i in range(n_images)] if n_images else []
    n_text = length - n_image
    texts = [n_text // (n_images + 1) + (i < n_text % (n_images + 1)) for i in range(n_images + 1)]
    ids: list[torch.Tensor] = []
    for i, text in enumerate(texts):
        ids.append(torch.randint(3, config.image_token_id - 1, (text,), generator=generator))
        if i < n_images:
            ids.append(torch.full((sizes[i],), config.image_token_id))
    input_ids = torch.cat(ids)[None]
    input_ids[0, 0] = BOS
    features = [0.02 * torch.randn(n, config.hidden, generator=generator) for n in sizes]
    return Prompt(input_ids, features)


# -- memory ----------------------------------------------------------------------------------


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """glibc's ``mallopt(M_MMAP_THRESHOLD)`` and ``mallopt(M_TRIM_THRESHOLD)``; False where unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, mmap_threshold)) and bool(libc.mallopt(-1, trim_threshold))
    except (OSError, AttributeError):
        return False


def release_free_memory() -> None:
    """Collect garbage and return the C heap's free pages to the system (glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- compression probe -----------------------------------------------------------------------


class CompressionProbe:
    """Times the session's compression steps and their peak memory, from outside the library.

    Wraps ``CompressionSession._plan_prefill`` (the strategy's plan, inside each layer's
    attention) and ``CompressionSession._after_attention`` (the plan applied to the cache) while
    ``active``. Each step's peak RSS growth is measured from a reset high-water mark. If the
    session's internals are renamed, the probe stays inactive and reports ``None``.
    """

    def __init__(self) -> None:
        self.active = False
        self.available = False
        self.seconds = 0.0
        self.steps = 0
        self.peak_growth = 0
        self._undo: list[Any] = []

    def reset(self) -> None:
        """Start a new measurement."""
        self.seconds, self.steps, self.peak_growth = 0.0, 0, 0

    def install(self) -> None:
        """Wrap the session's methods (once)."""
        from kvpress_mm.session import CompressionSession

        names = ("_plan_prefill", "_after_attention")
        if not all(callable(getattr(CompressionSession, n, None)) for n in names):
            return
        probe = self
        for name in names:
            original = getattr(CompressionSession, name)

            def timed(self: Any, *args: Any, __original: Any = original, __name: str = name, **kwargs: Any) -> Any:
                if not probe.active or (__name == "_after_attention" and not self._pending):
                    return __original(self, *args, **kwargs)
                before = rss_bytes()
                reset_peak_rss()
                start = time.perf_counter()
                try:
                    return __original(self, *args, **kwargs)
                finally:
                    probe.seconds += time.perf_counter() - start
                    probe.steps += 1
                    probe.peak_growth = max(probe.peak_growth, peak_rss_bytes() - before)

            setattr(CompressionSession, name, timed)
            self._undo.append((name, original))
        self.available = True

    def uninstall(self) -> None:
        """Put the session's methods back."""
        from kvpress_mm.session import CompressionSession

        for name, original in self._undo:
            setattr(CompressionSession, name, original)
        self._undo.clear()
        self.available = False


# -- phase A: one prefill per arm ------------------------------------------------------------


def weight_bytes(model: Any) -> int:
    """Bytes of the parameters a decode step reads: the text decoder's layers, final norm and LM head."""
    language_model = model.model.language_model
    modules = [language_model.layers, language_model.norm, model.lm_head]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def cache_sizes(cache: Any) -> tuple[int, int]:
    """``(bytes held, bytes allocated)`` of a cache's keys and values (a growing layer's headroom counts)."""
    held = allocated = 0
    for layer in getattr(cache, "layers", ()):
        layer_held = 0
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                layer_held += tensor.numel() * tensor.element_size()
        allocated_bytes = getattr(layer, "allocated_bytes", None)
        held += layer_held
        allocated += int(allocated_bytes()) if callable(allocated_bytes) else layer_held
    return held, allocated


class StepTimer:
    """A logits processor that timestamps every generation step; at the first (end of prefill) it
    also reads the process CPU time and the RSS high-water mark, and sizes the cache."""

    def __init__(self, cache: Any, probe: CompressionProbe | None) -> None:
        self.cache = cache
        self.probe = probe
        self.stamps: list[float] = []
        self.cpu = 0.0
        self.prefill_peak = 0
        self.held = self.allocated = 0
        self.layer_types: list[str] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1:
            self.cpu = time.process_time()
            if self.probe is not None:
                self.probe.active = False
            self.prefill_peak = peak_rss_bytes()
            self.held, self.allocated = cache_sizes(self.cache)
            self.layer_types = sorted({type(layer).__name__ for layer in self.cache.layers})
        return scores


def _compressor(arm: Arm) -> Any:
    from kvpress_mm import Compressor

    if arm.strategy == NATIVE or arm.derived_from is not None:
        return None
    return Compressor.from_name(arm.strategy, compression_ratio=arm.ratio)


def prefill_once(model: Any, arm: Arm, prompt: Prompt, probe: CompressionProbe | None = None) -> dict[str, Any]:
    """One timed prefill of ``arm`` (``generate`` of one token): times, memory, cache sizes, the cache."""
    from transformers import DynamicCache, LogitsProcessorList

    cache = DynamicCache(config=model.config)
    timer = StepTimer(cache, probe)
    options: dict[str, Any] = dict(
        prompt.generate_kwargs(),
        max_new_tokens=1,
        do_sample=False,
        cache=cache,
        logits_processor=LogitsProcessorList([timer]),
        return_dict_in_generate=True,
    )
    compressor = _compressor(arm)
    report = None
    release_free_memory()
    if probe is not None:
        probe.reset()
        probe.active = probe.available
    reset_peak_rss()
    rss_before = rss_bytes()
    with torch.inference_mode():
        cpu_start = time.process_time()
        start = time.perf_counter()
        if compressor is None:
            out = model.generate(prompt.input_ids, **options)
        else:
            with compressor(model, growing_cache=arm.cache == "growing") as session:
                out = model.generate(prompt.input_ids, **options)
            report = session.report
    if probe is not None:
        probe.active = False
    compressing = arm.strategy not in (FULL, NATIVE)
    measured = probe if probe is not None and probe.available and compressing else None
    return {
        "prefill_s": timer.stamps[0] - start,
        "prefill_cpu_s": timer.cpu - cpu_start,
        "compression_s": measured.seconds if measured else (None if compressing else 0.0),
        "compression_steps": measured.steps if measured else 0,
        "compression_peak_growth": measured.peak_growth if measured else None,
        "prefill_peak_growth": max(0, timer.prefill_peak - rss_before),
        "rss_before": rss_before,
        "kv_bytes_held": timer.held,
        "kv_bytes_allocated": timer.allocated,
        "cache_layer_types": timer.layer_types,
        "report": None
        if report is None
        else {
            "kv_bytes_before": report.kv_bytes_before,
            "kv_bytes_after": report.kv_bytes_after,
            "layers_compressed": report.layers_compressed,
            "n_keep": list(report.n_keep),
        },
        "state": {"cache": cache, "next_token": out.sequences[:, -1:], "position": int(prompt.input_ids.shape[1])},
    }


WARMUP_TOKENS = 128


def prefill_arm(
    model: Any, config: Config, arm: Arm, probe: CompressionProbe | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A warm-up on a short prompt, then ``config.repeats`` measured prefills of ``arm``: (figures, last cache)."""
    prefill_once(model, arm, make_prompt(config, min(WARMUP_TOKENS, arm.prompt_length)))  # lazy initialisations
    runs: list[dict[str, Any]] = []
    for _ in range(config.repeats):
        if runs:
            runs[-1].pop("state")  # free the previous cache before the next prefill
        runs.append(prefill_once(model, arm, make_prompt(config, arm.prompt_length), probe))
    first, last = runs[0], runs[-1]
    state = last.pop("state")
    return {
        "arm": asdict(arm),
        "key": arm.key,
        "prompt_length": arm.prompt_length,
        "derived_from": None,
        "prefill_s": [r["prefill_s"] for r in runs],
        "prefill_cpu_s": [r["prefill_cpu_s"] for r in runs],
        "compression_s": [r["compression_s"] for r in runs if r["compression_s"] is not None],
        "compression_peak_growth": first["compression_peak_growth"],
        "compression_steps": first["compression_steps"],
        "prefill_peak_growth": first["prefill_peak_growth"],
        "kv_bytes_held": first["kv_bytes_held"],
        "kv_bytes_allocated": first["kv_bytes_allocated"],
        "cache_layer_types": first["cache_layer_types"],
        "report": first["report"],
        "weight_bytes": weight_bytes(model),
    }, state


def derive_growing(model: Any, arm: Arm, source: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An uncompressed growing arm: the stock arm's cache copied into ``GrowingLayer`` s (no prefill)."""
    from transformers import DynamicCache

    from kvpress_mm.cache.growing import GrowingLayer

    stock = source["cache"]
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer.from_tensors(layer.keys, layer.values) for layer in stock.layers]
    held, allocated = cache_sizes(cache)
    state = {"cache": cache, "next_token": source["next_token"].clone(), "position": source["position"]}
    base = arm.derived_from
    assert base is not None
    return {
        "arm": asdict(arm),
        "key": arm.key,
        "prompt_length": arm.prompt_length,
        "derived_from": base.key,
        "prefill_s": [],
        "prefill_cpu_s": [],
        "compression_s": [],
        "compression_peak_growth": None,
        "compression_steps": 0,
        "prefill_peak_growth": None,
        "kv_bytes_held": held,
        "kv_bytes_allocated": allocated,
        "cache_layer_types": sorted({type(layer).__name__ for layer in cache.layers}),
        "report": None,
        "weight_bytes": weight_bytes(model),
    }, state


# -- decoding: every arm of one prompt length, interleaved ----------------------------------


@dataclass
class Decoder:
    """One arm's cache and where its greedy continuation stands."""

    arm: Arm
    cache: Any
    token: torch.Tensor  # [1, 1] the next input token
    position: int  # its absolute position (= mask columns seen so far)
    step_ms: list[float]
    peak_growth: int = 0

    def run(self, model: Any, steps: int, timed: bool) -> None:
        """``steps`` greedy decode steps (a manual loop with absolute positions and the full mask)."""
        from contextlib import nullcontext

        compressor = _compressor(self.arm)
        context = nullcontext() if compressor is None else compressor(model, growing_cache=self.arm.cache == "growing")
        if timed:
            reset_peak_rss()
        before = rss_bytes()
        with context, torch.inference_mode():
            for _ in range(steps):
                start = time.perf_counter()
                out = model(
                    input_ids=self.token,
                    attention_mask=torch.ones(1, self.position + 1, dtype=torch.long),
                    position_ids=torch.tensor([[self.position]]),
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                self.token = out.logits[:, -1:].argmax(-1)
                elapsed = time.perf_counter() - start
                self.position += 1
                if timed:
                    self.step_ms.append(1000 * elapsed)
        if timed:
            self.peak_growth = max(self.peak_growth, peak_rss_bytes() - before)


def decode_rounds(config: Config) -> int:
    """Turns each arm takes to decode ``config.decode_tokens`` tokens."""
    burst = max(1, min(config.decode_burst, config.decode_tokens))
    return -(-config.decode_tokens // burst)


def decode_group(
    model: Any,
    config: Config,
    arms: list[Arm],
    states: list[dict[str, Any]],
    progress: Any = None,
) -> dict[str, dict[str, Any]]:
    """Decode ``config.decode_tokens`` tokens for every arm, interleaved in bursts, in a rotating order.

    All arms of one prompt length decode in one process, a burst of steps each in turn, so that
    their ms/token are measured under the same conditions (other load on the machine varies).
    ``progress(text)`` is called after each round.
    """
    decoders = [Decoder(arm, s["cache"], s["next_token"], s["position"], []) for arm, s in zip(arms, states)]
    for decoder in decoders:  # warm-up: lazy initialisations, untimed
        decoder.run(model, 2, timed=False)
    release_free_memory()
    burst = max(1, min(config.decode_burst, config.decode_tokens))
    rounds = decode_rounds(config)
    for index in range(rounds):
        shift = index % len(decoders)
        for decoder in decoders[shift:] + decoders[:shift]:
            decoder.run(model, min(burst, config.decode_tokens - len(decoder.step_ms)), timed=True)
        if progress is not None:
            progress(f"decode L={arms[0].length}: {len(arms)} arms, round {index + 1}/{rounds}")
    return {
        d.arm.key: {
            "decode_step_ms": d.step_ms,
            "decode_ms_per_token": statistics.median(d.step_ms) if d.step_ms else None,
            "decode_ms_mean": statistics.fmean(d.step_ms) if d.step_ms else None,
            "decode_peak_growth": d.peak_growth,
            "kv_bytes_after_decode": cache_sizes(d.cache)[0],
        }
        for d in decoders
    }


def run_group(
    model: Any, config: Config, arms: list[Arm], probe: CompressionProbe | None, progress: Any
) -> dict[str, dict[str, Any]]:
    """Every arm of one prompt length: its prefill (or copy), then interleaved decoding."""
    results: dict[str, dict[str, Any]] = {}
    states: dict[str, dict[str, Any]] = {}
    for arm in arms:
        base = arm.derived_from
        if base is not None and base.key in states:
            results[arm.key], states[arm.key] = derive_growing(model, arm, states[base.key])
        else:
            results[arm.key], states[arm.key] = prefill_arm(model, config, arm, probe)
        progress(f"prefill {arm.key}")
    set_malloc_thresholds(DECODE_MMAP_THRESHOLD, 2 * DECODE_MMAP_THRESHOLD)  # see DECODE_MMAP_THRESHOLD
    decoded = decode_group(model, config, arms, [states.pop(a.key) for a in arms], progress)
    for key, figures in decoded.items():
        results[key].update(figures)
    return results


# -- processes -------------------------------------------------------------------------------


def config_to_json(config: Config) -> str:
    """``config`` as JSON (tuples become lists)."""
    return json.dumps(asdict(config))


def config_from_json(text: str) -> Config:
    """Inverse of :func:`config_to_json`."""
    data = json.loads(text)
    for name, value in data.items():
        if isinstance(value, list):
            data[name] = tuple(value)
    return Config(**data)


def groups_of(arms: list[Arm]) -> dict[int, list[Arm]]:
    """Arms by prompt length ``L`` (native-K arms with the ``L`` they stand for): one process each."""
    groups: dict[int, list[Arm]] = {}
    for arm in arms:
        groups.setdefault(arm.length, []).append(arm)
    return dict(sorted(groups.items()))


def worker(config: Config, arms: list[Arm], out: Path) -> None:
    """One prompt length in this (fresh) process; progress lines on stderr, results as JSON in ``out``."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)

    def progress(text: str) -> None:
        print(PROGRESS + text, file=sys.stderr, flush=True)

    model = build_model(config)
    probe = CompressionProbe()
    probe.install()
    try:
        results = run_group(model, config, arms, probe, progress)
    finally:
        probe.uninstall()
    out.write_text(json.dumps(results))


def run_worker(config: Config, arms: list[Arm], bar: Any) -> dict[str, dict[str, Any]]:
    """:func:`worker` for ``arms`` in a fresh process; its progress lines advance ``bar``."""
    import collections
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kvpress-mm-decode-") as scratch:
        out = Path(scratch) / "results.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker-config",
            config_to_json(config),
            "--worker-arms",
            json.dumps([asdict(a) for a in arms]),
            "--worker-out",
            str(out),
        ]
        tail: collections.deque[str] = collections.deque(maxlen=60)
        with subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **MALLOC_ENV}
        ) as process:
            assert process.stderr is not None
            for line in process.stderr:
                if line.startswith(PROGRESS):
                    bar.set_postfix_str(line[len(PROGRESS) :].strip())
                    bar.update()
                else:
                    tail.append(line)
        if process.returncode != 0:
            raise RuntimeError(f"decode worker for L={arms[0].length} failed:\n{''.join(tail)[-4000:]}")
        return dict(json.loads(out.read_text()))


def measure(config: Config, isolation: str = "process", progress: bool = True) -> dict[str, dict[str, Any]]:
    """Every arm of the run, keyed by :attr:`Arm.key`: one process (or this one) per prompt length."""
    from tqdm import tqdm

    groups = groups_of(unique_arms(plan_arms(config)))
    total = sum(len(g) for g in groups.values()) + len(groups) * decode_rounds(config)
    results: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=total, desc="decode benchmark", unit="step", disable=not progress, file=sys.stderr)

    def advance(text: str) -> None:
        bar.set_postfix_str(text)
        bar.update()

    try:
        if isolation == "process":
            for arms in groups.values():
                results.update(run_worker(config, arms, bar))
        else:
            model = build_model(config)
            probe = CompressionProbe()
            probe.install()
            try:
                for arms in groups.values():
                    results.update(run_group(model, config, arms, probe, advance))
            finally:
                probe.uninstall()
    finally:
        bar.close()
    return results


# -- summary ---------------------------------------------------------------------------------


def _row(result: dict[str, Any]) -> dict[str, Any]:
    def mib(value: int | None) -> float | None:
        return None if value is None else value / 2**20

    return {
        "key": result["key"],
        **result["arm"],
        "prompt_length": result["prompt_length"],
        "derived_from": result.get("derived_from"),
        "prefill_s": median_or_none(result["prefill_s"]),
        "prefill_cpu_s": median_or_none(result.get("prefill_cpu_s", [])),
        "compression_s": median_or_none(result["compression_s"]),
        "decode_ms": result.get("decode_ms_per_token"),
        "decode_ms_mean": result.get("decode_ms_mean"),
        "prefill_peak_mib": mib(result["prefill_peak_growth"]),
        "decode_peak_mib": mib(result.get("decode_peak_growth", 0)),
        "compression_peak_mib": mib(result["compression_peak_growth"]),
        "kv_mib": result["kv_bytes_held"] / 2**20,
        "kv_allocated_mib": result["kv_bytes_allocated"] / 2**20,
        "weight_mib": result["weight_bytes"] / 2**20,
        "cache_layer_types": result["cache_layer_types"],
    }


def _overhead(row: dict[str, Any], full: dict[str, Any], cpu: bool) -> dict[str, Any]:
    """Compression overhead against ``full`` at the same length: wall, CPU, direct; ``overhead`` is the one judged."""
    prefill, compression = row["prefill_s"], row["compression_s"]
    direct = None
    if prefill is not None and compression is not None and prefill > compression:
        direct = 1 + compression / (prefill - compression)
    wall = ratio_or_none(prefill, full["prefill_s"])
    cpu_ratio = ratio_or_none(row["prefill_cpu_s"], full["prefill_cpu_s"])
    return {
        "overhead_end_to_end": wall,
        "overhead_cpu": cpu_ratio,
        "overhead_direct": direct,
        "overhead": cpu_ratio if cpu and cpu_ratio is not None else wall,
    }


def _linear_fit(xs: list[float], ys: list[float]) -> dict[str, float] | None:
    """Least squares ``y = intercept + slope * x`` and the largest residual relative to ``y``."""
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if not sxx:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    residual = max(abs(y - intercept - slope * x) / y for x, y in zip(xs, ys) if y) if any(ys) else 0.0
    return {"intercept": intercept, "slope": slope, "max_relative_residual": residual}


def memory_series(lengths: list[int], peaks: list[float | None]) -> dict[str, Any]:
    """Peak MiB at each L, bytes per prompt token, a linear fit and the check that doubling L at most doubles it.

    ``linear`` compares the bytes per token at the longest L with those at half of it (when the
    sweep has both): a ``[heads, L, L]`` allocation would double them; a linear cost keeps them
    level (or lower, with fixed costs).
    """
    pairs = [(n, v) for n, v in zip(lengths, peaks) if v is not None]
    per_token = {str(n): v * 2**20 / n for n, v in pairs}
    longest = max(lengths)
    half = longest // 2
    ratio = None
    if str(longest) in per_token and str(half) in per_token and per_token[str(half)] > 0:
        ratio = per_token[str(longest)] / per_token[str(half)]
    fit = _linear_fit([float(n) for n, _ in pairs], [v * 2**20 for _, v in pairs])
    return {
        "peak_mib": [v for _, v in pairs],
        "lengths": [n for n, _ in pairs],
        "bytes_per_token": per_token,
        "doubling_ratio": ratio,
        "fit_bytes": fit,
        "linear": None if ratio is None else ratio <= LINEAR_TOLERANCE,
    }


def summarize(config: Config, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tables of every part with ratios and targets."""
    parts = plan_arms(config)
    rows = {key: _row(result) for key, result in results.items()}
    cpu = config.threads == 1  # one thread: process CPU time is the prefill's own work

    grid_full = rows[Arm(FULL, 0.0, config.grid_length, "stock").key]
    grid = []
    for arm in parts["grid"]:
        row = dict(rows[arm.key])
        row.update(_overhead(row, grid_full, cpu))
        row["decode_speedup"] = ratio_or_none(grid_full["decode_ms"], row["decode_ms"])
        grid.append(row)

    longest = max(config.sweep_lengths)
    sweep = []
    for length in config.sweep_lengths:
        full = rows[Arm(FULL, 0.0, length, "stock").key]
        native_stock = rows[Arm(NATIVE, config.sweep_ratio, length, "stock").key]
        native_growing = rows[Arm(NATIVE, config.sweep_ratio, length, "growing").key]
        entry: dict[str, Any] = {
            "length": length,
            "K": native_stock["prompt_length"],
            "full": full,
            "native_stock": native_stock,
            "native_growing": native_growing,
            "strategies": {},
            "extra": {},
        }
        extra = [s for s in config.overhead_strategies if s not in config.sweep_strategies] if length == longest else []
        for strategy in (*config.sweep_strategies, *extra):
            row = dict(rows[Arm(strategy, config.sweep_ratio, length).key])
            row.update(_overhead(row, full, cpu))
            row["vs_native"] = ratio_or_none(row["decode_ms"], native_growing["decode_ms"])
            row["vs_native_stock"] = ratio_or_none(row["decode_ms"], native_stock["decode_ms"])
            row["decode_speedup"] = ratio_or_none(full["decode_ms"], row["decode_ms"])
            if strategy in config.sweep_strategies:
                row["native_met"] = row["vs_native"] is not None and row["vs_native"] <= NATIVE_TARGET
                entry["strategies"][strategy] = row
            else:
                entry["extra"][strategy] = row
        sweep.append(entry)
    last = sweep[[e["length"] for e in sweep].index(longest)]
    overhead_targets = {}
    for strategy, row in {**last["strategies"], **last["extra"]}.items():
        bound = OVERHEAD_TARGETS.get(strategy, OVERHEAD_TARGET_OTHERS)
        overhead_targets[strategy] = {
            "length": longest,
            "max": bound,
            "measure": "CPU time" if cpu and row["overhead_cpu"] is not None else "wall time",
            "overhead": row["overhead"],
            "wall": row["overhead_end_to_end"],
            "cpu": row["overhead_cpu"],
            "direct": row["overhead_direct"],
            "met": row["overhead"] is not None and row["overhead"] <= bound,
        }

    lengths = [e["length"] for e in sweep]
    memory: dict[str, Any] = {
        "lengths": lengths,
        "score_matrix_mib": [config.heads * n * n * 4 / 2**20 for n in lengths],  # one layer's [heads, L, L] float32
        "prefill": {"full": memory_series(lengths, [e["full"]["prefill_peak_mib"] for e in sweep])},
        "compression_step": {},
    }
    for strategy in config.sweep_strategies:
        series = [e["strategies"][strategy] for e in sweep]
        memory["prefill"][strategy] = memory_series(lengths, [r["prefill_peak_mib"] for r in series])
        memory["compression_step"][strategy] = memory_series(lengths, [r["compression_peak_mib"] for r in series])
    # the compression step, and the whole prefill (with strategies whose statistics are fused into attention)
    checked = [*memory["compression_step"].values(), *memory["prefill"].values()]
    verdicts = [s["linear"] for s in checked if s["linear"] is not None]
    memory["all_linear"] = all(verdicts) if verdicts else None

    length, ratio = config.cache_length, config.sweep_ratio
    named = {
        "full, stock cache": Arm(FULL, 0.0, length, "stock"),
        "full, our growing cache": Arm(FULL, 0.0, length, "growing"),
        f"{config.cache_strategy}, stock cache": Arm(config.cache_strategy, ratio, length, "stock"),
        f"{config.cache_strategy}, our growing cache": Arm(config.cache_strategy, ratio, length, "growing"),
    }
    for strategy in config.sweep_strategies:
        if strategy != config.cache_strategy and length in config.sweep_lengths:
            named[f"{strategy}, our growing cache"] = Arm(strategy, ratio, length, "growing")
    named["native-K, stock cache"] = Arm(NATIVE, ratio, length, "stock")
    named["native-K, our growing cache"] = Arm(NATIVE, ratio, length, "growing")
    base = rows[named["full, stock cache"].key]
    base_growing = rows[named["full, our growing cache"].key]
    weights = base["weight_mib"]
    caches = []
    for name, arm in named.items():
        row = dict(rows[arm.key], name=name)
        row["decode_speedup"] = ratio_or_none(base["decode_ms"], row["decode_ms"])
        row["decode_speedup_vs_growing"] = ratio_or_none(base_growing["decode_ms"], row["decode_ms"])
        row["bytes_bound"] = (weights + base["kv_mib"]) / (weights + row["kv_mib"])
        caches.append(row)

    return {
        "benchmark": "decode",
        "config": asdict(config),
        "machine": machine_info(source_tree=True),
        "targets": {
            "native_ratio_max": NATIVE_TARGET,
            "overhead_max": {s: t["max"] for s, t in overhead_targets.items()},
            "wall_minutes_max": WALL_TARGET_MINUTES,
            "linear_doubling_ratio_max": LINEAR_TOLERANCE,
        },
        "grid": grid,
        "sweep": sweep,
        "overhead_targets": overhead_targets,
        "memory": memory,
        "caches": caches,
        "all_native_targets_met": all(r["native_met"] for e in sweep for r in e["strategies"].values()),
        "allocator": {
            "prefill": "glibc, MALLOC_MMAP_THRESHOLD_=131072 (process isolation)",
            "decode": f"glibc, mallopt M_MMAP_THRESHOLD={DECODE_MMAP_THRESHOLD}",
        },
        "arms": results,
    }


# -- output ----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    """``value`` formatted, or a dash as wide as the spec's width (the printed tables' columns stay aligned)."""
    return fmt(value, spec, align_dash=True)


def _verdict(met: bool | None) -> str:
    return "" if met is None else ("PASS" if met else "MISS")


def _memory_checks(memory: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The memory series checked for linearity, named: each strategy's compression step and whole prefill."""
    checks = []
    for strategy in memory["compression_step"]:
        checks.append((f"{strategy} compression step", memory["compression_step"][strategy]))
        checks.append((f"{strategy} whole prefill", memory["prefill"][strategy]))
    return checks


def _sweep_rows(entry: dict[str, Any]) -> list[tuple[str, dict[str, Any], Any]]:
    """The rows of one sweep length, as both tables list them: ``(name, row, row if compressed else None)``.

    The third element is typed ``Any``: the tables read it as ``compressed and compressed[key]``.
    """
    uncompressed = [
        ("full (stock)", entry["full"]),
        ("native-K (stock)", entry["native_stock"]),
        ("native-K (growing)", entry["native_growing"]),
    ]
    compressed = {**entry["strategies"], **entry["extra"]}
    return [(name, row, None) for name, row in uncompressed] + [
        (f"{strategy} (growing)", row, row) for strategy, row in compressed.items()
    ]


def _peak_at(series: dict[str, Any], length: int) -> float | None:
    return series["peak_mib"][series["lengths"].index(length)] if length in series["lengths"] else None


def format_tables(summary: dict[str, Any]) -> str:
    """The printed report: model, grid, sweep, overhead, memory, cache arms."""
    config, machine = summary["config"], summary["machine"]
    lines = [
        f"decode: LLaVA (Llama text model hidden {config['hidden']}, MLP {config['intermediate']}, "
        f"{config['layers']} layers, {config['heads']} heads / {config['kv_heads']} KV heads, vocab {config['vocab']}, "
        f"float32, sdpa), prompts {100 * config['image_fraction']:g}% image tokens, {config['decode_tokens']} "
        f"decode tokens, {config['repeats']} repeat(s), one process per prompt length",
        f"torch {machine['torch']}, transformers {machine['transformers']}, {machine['torch_threads']} threads, "
        f"{machine['cpu_count']} CPUs, load average at the end {machine['load_average']}",
        "decode = median ms per decode step; ovh = prefill with compression / prefill of full at the same L "
        "(CPU time with one thread, else wall; 'ovh wall' = wall time), 'ovh dir' = 1 + compression / "
        "(prefill - compression); peak = RSS high-water growth of the prefill, step = of the largest compression step",
        "",
        f"GRID (L = {config['grid_length']})",
    ]
    header = (
        f"{'strategy':<15} {'r':>4} {'prefill s':>9} {'compr s':>8} {'ovh':>6} {'ovh wall':>8} {'ovh dir':>7} "
        f"{'peak MiB':>8} {'step MiB':>8} {'KV MiB':>8} {'decode ms':>9} {'speedup':>7}"
    )
    lines += [header, "-" * len(header)]
    for row in summary["grid"]:
        compressed = row["strategy"] != FULL
        lines.append(
            f"{row['strategy']:<15} {(format(row['ratio'], '.1f') if compressed else '-'):>4} "
            f"{_fmt(row['prefill_s'], '9.2f')} {_fmt(row['compression_s'], '8.3f')} "
            f"{_fmt(row['overhead'], '6.3f')} {_fmt(row['overhead_end_to_end'], '8.3f')} "
            f"{_fmt(row['overhead_direct'] if compressed else None, '7.3f')} "
            f"{_fmt(row['prefill_peak_mib'], '8.0f')} {_fmt(row['compression_peak_mib'], '8.1f')} "
            f"{_fmt(row['kv_mib'], '8.1f')} {_fmt(row['decode_ms'], '9.1f')} {_fmt(row['decode_speedup'], '7.2f')}"
        )
    lines += [
        "",
        f"LENGTH SWEEP (r = {config['sweep_ratio']}; native-K: a K-token prompt, no compressor; '/native' = decode ms "
        "over native-K's with the same (growing) cache, target <= "
        f"{NATIVE_TARGET}; '/nat.stk' = over native-K's with the stock cache)",
    ]
    header = (
        f"{'L':>6} {'K':>5} {'arm':<22} {'prefill s':>9} {'compr s':>8} {'ovh':>6} {'ovh wall':>8} "
        f"{'peak MiB':>8} {'step MiB':>8} {'KV MiB':>8} {'decode ms':>9} {'/native':>7} {'':4} {'/nat.stk':>8} "
        f"{'speedup':>7}"
    )
    lines += [header, "-" * len(header)]
    for entry in summary["sweep"]:
        length, k = entry["length"], entry["K"]
        for name, row, compressed in _sweep_rows(entry):
            native_met = compressed.get("native_met") if compressed else None
            lines.append(
                f"{length:>6} {k:>5} {name:<22} {_fmt(row['prefill_s'], '9.2f')} {_fmt(row['compression_s'], '8.3f')} "
                f"{_fmt(compressed and compressed['overhead'], '6.3f')} "
                f"{_fmt(compressed and compressed['overhead_end_to_end'], '8.3f')} "
                f"{_fmt(row['prefill_peak_mib'], '8.0f')} "
                f"{_fmt(row['compression_peak_mib'] if compressed else None, '8.1f')} {_fmt(row['kv_mib'], '8.1f')} "
                f"{_fmt(row['decode_ms'], '9.1f')} {_fmt(compressed and compressed['vs_native'], '7.3f')} "
                f"{_verdict(native_met):4} "
                f"{_fmt(compressed and compressed['vs_native_stock'], '8.3f')} "
                f"{_fmt(compressed and compressed['decode_speedup'], '7.2f')}"
            )
    lines.append("")
    lines.append(f"COMPRESSION OVERHEAD at L = {max(config['sweep_lengths'])} (prefill with compression / without):")
    for strategy, target in summary["overhead_targets"].items():
        lines.append(
            f"  {strategy:<15} {_fmt(target['overhead'], '.3f')} ({target['measure']}; "
            f"wall {_fmt(target['wall'], '.3f')}, direct {_fmt(target['direct'], '.3f')}) "
            f"target <= {target['max']} {_verdict(target['met'])}"
        )
    memory = summary["memory"]
    strategies = list(memory["compression_step"])
    lines += [
        "",
        "PEAK MEMORY vs L (RSS high-water growth, MiB; B/tok = bytes per prompt token; [H,L,L] = one layer's "
        "float32 score matrix, never allocated)",
    ]
    header = f"{'L':>6} {'[H,L,L] MiB':>11} {'full prefill':>12}" + "".join(
        f" {s + ' prefill':>22} {'step':>7} {'step B/tok':>10}" for s in strategies
    )
    lines += [header, "-" * len(header)]
    full_series = memory["prefill"]["full"]
    for index, length in enumerate(memory["lengths"]):
        line = f"{length:>6} {memory['score_matrix_mib'][index]:>11.0f} {_fmt(_peak_at(full_series, length), '12.0f')}"
        for strategy in strategies:
            step = memory["compression_step"][strategy]
            line += (
                f" {_fmt(_peak_at(memory['prefill'][strategy], length), '22.0f')} "
                f"{_fmt(_peak_at(step, length), '7.1f')} "
                f"{_fmt(step['bytes_per_token'].get(str(length)), '10.0f')}"
            )
        lines.append(line)
    for name, series in _memory_checks(memory):
        fit = series["fit_bytes"]
        fit_text = (
            "-"
            if fit is None
            else f"{fit['slope']:.0f} B/token + {fit['intercept'] / 2**20:.1f} MiB "
            f"(largest residual {100 * fit['max_relative_residual']:.0f}%)"
        )
        lines.append(
            f"  {name}: linear fit {fit_text}; bytes/token at L over at L/2: "
            f"{_fmt(series['doubling_ratio'], '.2f')} (linear: <= {LINEAR_TOLERANCE}) {_verdict(series['linear'])}"
        )
    lines += [
        "",
        f"CACHE ARMS (L = {config['cache_length']}, r = {config['sweep_ratio']}; speedup over full with the stock "
        "cache and over full with our growing cache; bytes bound = (weights + full KV) / (weights + arm KV))",
    ]
    header = (
        f"{'arm':<34} {'KV MiB':>8} {'alloc MiB':>9} {'step peak MiB':>13} {'decode ms':>9} {'speedup':>7} "
        f"{'vs growing':>10} {'bytes bound':>11}"
    )
    lines += [header, "-" * len(header)]
    for row in summary["caches"]:
        lines.append(
            f"{row['name']:<34} {_fmt(row['kv_mib'], '8.1f')} {_fmt(row['kv_allocated_mib'], '9.1f')} "
            f"{_fmt(row['decode_peak_mib'], '13.1f')} {_fmt(row['decode_ms'], '9.1f')} "
            f"{_fmt(row['decode_speedup'], '7.2f')} {_fmt(row['decode_speedup_vs_growing'], '10.2f')} "
            f"{_fmt(row['bytes_bound'], '11.2f')}"
        )
    weights = summary["caches"][0]["weight_mib"]
    lines += [
        f"weights read per decode step = {weights:.0f} MiB (text decoder layers, final norm, LM head)",
        "",
        f"native-K target (compressed / native-K with the same cache class <= {NATIVE_TARGET}) at every length: "
        f"{'PASS' if summary['all_native_targets_met'] else 'MISS'}",
    ]
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """A Markdown table; the first ``left`` columns are text (left-aligned), the others numbers."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < left else "--:" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def format_markdown(summary: dict[str, Any]) -> str:
    """The tables of :func:`format_tables` as Markdown (for docs/performance.md)."""
    config = summary["config"]
    out = [f"**Grid** (L = {config['grid_length']})", ""]
    rows = []
    for row in summary["grid"]:
        compressed = row["strategy"] != FULL
        rows.append(
            [
                f"`{row['strategy']}`",
                format(row["ratio"], ".1f") if compressed else "-",
                fmt(row["prefill_s"], ".2f"),
                fmt(row["compression_s"], ".3f"),
                fmt(row["overhead"], ".3f") if compressed else "1",
                fmt(row["prefill_peak_mib"], ".0f"),
                fmt(row["compression_peak_mib"], ".1f"),
                fmt(row["kv_mib"], ".1f"),
                fmt(row["decode_ms"], ".1f"),
                fmt(row["decode_speedup"], ".2f"),
            ]
        )
    header = [
        "strategy",
        "r",
        "prefill s",
        "compression s",
        "overhead",
        "prefill peak MiB",
        "step peak MiB",
        "KV MiB",
        "decode ms/token",
        "speedup",
    ]
    out += _md_table(header, rows)
    out += ["", f"**Length sweep** (r = {config['sweep_ratio']})", ""]
    rows = []
    for entry in summary["sweep"]:
        for name, row, compressed in _sweep_rows(entry):
            met = compressed.get("native_met") if compressed else None
            rows.append(
                [
                    str(entry["length"]),
                    str(entry["K"]),
                    name,
                    fmt(row["prefill_s"], ".2f"),
                    fmt(row["compression_s"], ".3f"),
                    fmt(compressed and compressed["overhead"], ".3f"),
                    fmt(row["kv_mib"], ".1f"),
                    fmt(row["decode_ms"], ".1f"),
                    (fmt(compressed and compressed["vs_native"], ".3f") + f" {_verdict(met)}").strip(),
                    fmt(compressed and compressed["decode_speedup"], ".2f"),
                ]
            )
    header = [
        "L",
        "K",
        "arm",
        "prefill s",
        "compression s",
        "overhead",
        "KV MiB",
        "decode ms/token",
        "/ native-K",
        "speedup",
    ]
    out += _md_table(header, rows, left=3)
    out += ["", f"**Compression overhead** at L = {max(config['sweep_lengths'])}", ""]
    rows = [
        [
            f"`{strategy}`",
            fmt(t["overhead"], ".3f"),
            t["measure"],
            fmt(t["wall"], ".3f"),
            fmt(t["direct"], ".3f"),
            f"<= {t['max']}",
            _verdict(t["met"]),
        ]
        for strategy, t in summary["overhead_targets"].items()
    ]
    out += _md_table(["strategy", "overhead", "measured on", "wall", "direct", "target", "verdict"], rows)
    memory = summary["memory"]
    strategies = list(memory["compression_step"])
    out += ["", "**Peak memory against L** (RSS high-water growth, MiB)", ""]
    header = ["L", "[heads, L, L] fp32", "full: prefill"]
    for strategy in strategies:
        header += [f"{strategy}: prefill", f"{strategy}: step", f"{strategy}: step B/token"]
    rows = []
    for index, length in enumerate(memory["lengths"]):
        row = [
            str(length),
            f"{memory['score_matrix_mib'][index]:.0f}",
            fmt(_peak_at(memory["prefill"]["full"], length), ".0f"),
        ]
        for strategy in strategies:
            step = memory["compression_step"][strategy]
            row += [
                fmt(_peak_at(memory["prefill"][strategy], length), ".0f"),
                fmt(_peak_at(step, length), ".1f"),
                fmt(step["bytes_per_token"].get(str(length)), ".0f"),
            ]
        rows.append(row)
    out += _md_table(header, rows)
    out.append("")
    for name, series in _memory_checks(memory):
        fit = series["fit_bytes"]
        if fit is not None:
            out.append(
                f"- {name}: {fit['slope']:.0f} bytes/token + {fit['intercept'] / 2**20:.1f} MiB "
                f"(largest residual {100 * fit['max_relative_residual']:.0f}%); bytes per token at L over L/2: "
                f"{fmt(series['doubling_ratio'], '.2f')} {_verdict(series['linear'])}"
            )
    out += ["", f"**Cache arms** (L = {config['cache_length']}, r = {config['sweep_ratio']})", ""]
    rows = [
        [
            row["name"],
            fmt(row["kv_mib"], ".1f"),
            fmt(row["kv_allocated_mib"], ".1f"),
            fmt(row["decode_ms"], ".1f"),
            fmt(row["decode_speedup"], ".2f"),
            fmt(row["decode_speedup_vs_growing"], ".2f"),
            fmt(row["bytes_bound"], ".2f"),
        ]
        for row in summary["caches"]
    ]
    header = [
        "arm",
        "KV MiB",
        "allocated MiB",
        "decode ms/token",
        "speedup vs full stock",
        "vs full growing",
        "bytes bound",
    ]
    out += _md_table(header, rows)
    return "\n".join(out) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Decode ms/token against prompt length (log L), one line per arm of the sweep; beside it, peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sweep = summary["sweep"]
    config = summary["config"]
    lengths = [e["length"] for e in sweep]
    ticks = [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths]
    lines: dict[str, list[float | None]] = {
        "full (stock DynamicCache)": [e["full"]["decode_ms"] for e in sweep],
        "native-K (stock DynamicCache)": [e["native_stock"]["decode_ms"] for e in sweep],
        "native-K (GrowingLayer)": [e["native_growing"]["decode_ms"] for e in sweep],
    }
    ratio = config["sweep_ratio"]
    for strategy in config["sweep_strategies"]:
        lines[f"{strategy} r={ratio:g} (GrowingLayer)"] = [e["strategies"][strategy]["decode_ms"] for e in sweep]
    figure, (axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    styles = ["o-", "s--", "s-", "^-", "v-", "d-", "x-"]
    for (label, values), style in zip(lines.items(), styles):
        points = [(x, y) for x, y in zip(lengths, values) if y is not None]
        axis.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")  # the stock full cache grows far faster than the rest: log keeps both readable
    axis.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    axis.tick_params(axis="y", which="minor", labelsize=7)
    axis.set_xticks(lengths, ticks)
    axis.set_xlabel("prompt length L (native-K: the L its K = int(L * (1 - r)) stands for)", fontsize=9)
    axis.set_ylabel("decode ms / token (median step)")
    axis.set_title(
        f"Decode, random LLaVA (hidden {config['hidden']}, {config['layers']} layers, "
        f"{config['kv_heads']} KV heads), {100 * config['image_fraction']:g}% image tokens",
        fontsize=9,
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)

    memory = summary["memory"]
    full = memory["prefill"]["full"]
    memory_axis.plot(full["lengths"], full["peak_mib"], "o-", label="full: whole prefill")
    for index, (strategy, series) in enumerate(memory["compression_step"].items()):
        color = f"C{index + 1}"
        prefill = memory["prefill"][strategy]
        memory_axis.plot(
            prefill["lengths"], prefill["peak_mib"], "s--", color=color, label=f"{strategy}: whole prefill"
        )
        memory_axis.plot(
            series["lengths"], series["peak_mib"], "^-", color=color, label=f"{strategy}: compression step"
        )
    memory_axis.plot(
        lengths, memory["score_matrix_mib"], ":", color="grey", label="one [heads, L, L] fp32 (not allocated)"
    )
    memory_axis.set_xscale("log", base=2)
    memory_axis.set_yscale("log")
    memory_axis.set_xticks(lengths, ticks)
    memory_axis.set_xlabel("prompt length L", fontsize=9)
    memory_axis.set_ylabel("peak RSS growth (MiB)")
    memory_axis.set_title("Peak memory (slope 1 = linear in L)", fontsize=9)
    memory_axis.grid(True, which="both", alpha=0.3)
    memory_axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


# -- command line ----------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help=f"a shorter run: {QUICK}")
    parser.add_argument(
        "--decode-tokens", type=int, default=None, help=f"tokens generated (default {defaults.decode_tokens})"
    )
    parser.add_argument(
        "--decode-burst",
        type=int,
        default=None,
        help=f"decode steps per arm and turn (default {defaults.decode_burst})",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed prefills per arm (median)")
    parser.add_argument("--grid-length", type=int, default=None)
    parser.add_argument("--grid-ratios", type=_floats, default=None, help="comma-separated")
    parser.add_argument("--grid-strategies", nargs="+", default=None)
    parser.add_argument("--sweep-lengths", type=_ints, default=None, help="comma-separated")
    parser.add_argument("--sweep-ratio", type=float, default=None)
    parser.add_argument("--sweep-strategies", nargs="+", default=None)
    parser.add_argument(
        "--overhead-strategies",
        nargs="*",
        default=None,
        help="strategies added at the longest sweep length only, for their prefill overhead "
        f"(default: {' '.join(defaults.overhead_strategies) or 'none'})",
    )
    parser.add_argument("--cache-length", type=int, default=None)
    parser.add_argument("--cache-strategy", default=None)
    add_model_arguments(parser, None)  # default None: an option given overrides --quick's value
    parser.add_argument("--image-tokens", type=int, default=None, help="placeholders per image")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--isolation",
        choices=("process", "inline"),
        default="process",
        help="a fresh process per prompt length (default; glibc mmap threshold fixed: honest peak memory) "
        "or everything in this process",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results; the plot goes beside it (.png)")
    parser.add_argument("--plot", type=Path, default=None, help="where to write the PNG (default: beside --out)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-arms", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    """A :class:`Config` from parsed arguments (``--quick`` first, explicit options over it)."""
    from kvpress_mm import Compressor

    config = Config(**QUICK) if args.quick else Config()  # type: ignore[arg-type]
    overrides = {
        name: getattr(args, name)
        for name in (
            "decode_tokens",
            "decode_burst",
            "repeats",
            "grid_length",
            "grid_ratios",
            "grid_strategies",
            "sweep_lengths",
            "sweep_ratio",
            "sweep_strategies",
            "overhead_strategies",
            "cache_length",
            "cache_strategy",
            *MODEL_SHAPE_FIELDS,
            "image_tokens",
            "threads",
            "seed",
        )
        if getattr(args, name) is not None
    }
    for name in ("grid_strategies", "sweep_strategies", "overhead_strategies"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    config = replace(config, **overrides)
    for name in (*config.grid_strategies, *config.sweep_strategies, *config.overhead_strategies, config.cache_strategy):
        Compressor.from_name(name)  # unknown names fail early, with the available ones
    return config


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables, write JSON and PNG; returns the summary."""
    args = parse_args(argv)
    if args.worker_config is not None:  # one prompt length, in a fresh process
        worker(config_from_json(args.worker_config), [Arm(**a) for a in json.loads(args.worker_arms)], args.worker_out)
        return {}
    config = config_from_args(args)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    results = measure(config, isolation=args.isolation, progress=not args.quiet)
    summary = summarize(config, results)
    summary["wall_seconds"] = time.perf_counter() - started
    summary["cpu_seconds"] = _cpu_seconds()
    summary["isolation"] = args.isolation
    print(format_tables(summary))
    threads = summary["machine"]["torch_threads"]
    minutes = summary["wall_seconds"] / 60
    summary["wall_target_met"] = minutes <= WALL_TARGET_MINUTES
    print(
        f"\nwall time: {minutes:.1f} min (target <= {WALL_TARGET_MINUTES:g}) {_verdict(summary['wall_target_met'])}; "
        f"CPU time {summary['cpu_seconds'] / 60:.1f} min (/ {threads} threads = "
        f"{summary['cpu_seconds'] / threads / 60:.1f} min: about the wall time when idle)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rounded(summary), indent=1) + "\n")
    plot_path = args.plot or args.out.with_suffix(".png")
    plot(summary, plot_path)
    markdown = args.out.with_suffix(".md")
    markdown.write_text(format_markdown(summary))
    print(f"written: {args.out}, {plot_path}, {markdown}")
    return summary


if __name__ == "__main__":
    main()
