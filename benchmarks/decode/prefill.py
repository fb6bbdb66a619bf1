"""The prefills of the decode benchmark: one timed prefill per arm (times, peak memory, cache sizes), its cache
kept for the decoding; the uncompressed growing arms copy their stock arm's cache instead."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from benchmarks.decode.arms import FULL, NATIVE, Arm, Config
from benchmarks.decode.inputs import Prompt, make_prompt, weight_bytes
from benchmarks.harness.memory import cache_sizes, peak_rss_bytes, release_free_memory, reset_peak_rss, rss_bytes
from benchmarks.harness.runs import CompressionProbe, StepTimer

WARMUP_TOKENS = 128


class PrefillTimer(StepTimer):
    """The step timer that, at the end of the prefill, stops the probe, reads the RSS high-water mark and
    sizes the cache."""

    def __init__(self, cache: Any, probe: CompressionProbe | None) -> None:
        super().__init__()
        self.cache = cache
        self.probe = probe
        self.prefill_peak = 0
        self.held = self.allocated = 0
        self.layer_types: list[str] = []
        self.head_lengths: list[list[int]] | None = None

    def at_prefill_end(self) -> None:
        if self.probe is not None:
            self.probe.active = False
        self.prefill_peak = peak_rss_bytes()
        self.held, self.allocated = cache_sizes(self.cache)
        self.layer_types = sorted({type(layer).__name__ for layer in self.cache.layers})
        self.head_lengths = head_lengths(self.cache)


def head_lengths(cache: Any) -> list[list[int]] | None:
    """Entries held by each KV head of each layer (a rectangular layer: its length for every head); ``None``
    when no layer is ragged."""
    from kvpress_mm.cache.ragged import RaggedLayer

    layers = cache.layers
    if not any(isinstance(layer, RaggedLayer) for layer in layers):
        return None
    return [
        layer.head_lengths if isinstance(layer, RaggedLayer) else [layer.get_seq_length()] * layer.keys.shape[1]
        for layer in layers
    ]


def prefill_once(model: Any, arm: Arm, prompt: Prompt, probe: CompressionProbe | None = None) -> dict[str, Any]:
    """One timed prefill of ``arm`` (``generate`` of one token): times, memory, cache sizes, the cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    timer = PrefillTimer(cache, probe)
    options: dict[str, Any] = dict(
        prompt.generate_kwargs(), max_new_tokens=1, do_sample=False, cache=cache, return_dict_in_generate=True
    )
    compressor = arm.compressor()
    release_free_memory()
    if probe is not None:
        probe.reset()
        probe.active = probe.available
    reset_peak_rss()
    rss_before = rss_bytes()
    out, session = timer.generate(model, prompt.input_ids, options, compressor, growing_cache=arm.cache == "growing")
    report = None if session is None else session.report
    if probe is not None:
        probe.active = False
    compressing = arm.strategy not in (FULL, NATIVE)
    measured = probe if probe is not None and probe.available and compressing else None
    return {
        "prefill_s": timer.prefill_s,
        "prefill_cpu_s": timer.prefill_cpu_s,
        "compression_s": measured.seconds if measured else (None if compressing else 0.0),
        "compression_steps": measured.steps if measured else 0,
        "compression_peak_growth": measured.peak_growth if measured else None,
        "prefill_peak_growth": max(0, timer.prefill_peak - rss_before),
        "rss_before": rss_before,
        "kv_bytes_held": timer.held,
        "kv_bytes_allocated": timer.allocated,
        "cache_layer_types": timer.layer_types,
        "head_lengths": timer.head_lengths,
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


def _figures(model: Any, arm: Arm, derived_from: Arm | None, measured: dict[str, Any]) -> dict[str, Any]:
    """An arm's result: what identifies it, what was measured, and the weight bytes a decode step reads."""
    return {
        "arm": asdict(arm),
        "key": arm.key,
        "prompt_length": arm.prompt_length,
        "derived_from": None if derived_from is None else derived_from.key,
        **measured,
        "weight_bytes": weight_bytes(model),
    }


#: What :func:`prefill_arm` reports from the first measured prefill (the times: every prefill's).
FIRST_PREFILL = (
    "compression_peak_growth",
    "compression_steps",
    "prefill_peak_growth",
    "kv_bytes_held",
    "kv_bytes_allocated",
    "cache_layer_types",
    "head_lengths",
    "report",
)


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
    state = runs[-1].pop("state")
    measured = {
        "prefill_s": [r["prefill_s"] for r in runs],
        "prefill_cpu_s": [r["prefill_cpu_s"] for r in runs],
        "compression_s": [r["compression_s"] for r in runs if r["compression_s"] is not None],
        **{name: runs[0][name] for name in FIRST_PREFILL},
    }
    return _figures(model, arm, None, measured), state


def derive_growing(model: Any, arm: Arm, source: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An uncompressed growing arm: the stock arm's cache copied into ``GrowingLayer`` s (no prefill)."""
    from transformers import DynamicCache

    from kvpress_mm.cache.growing import GrowingLayer

    stock = source["cache"]
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer.from_tensors(layer.keys, layer.values) for layer in stock.layers]
    held, allocated = cache_sizes(cache)
    state = {"cache": cache, "next_token": source["next_token"].clone(), "position": source["position"]}
    measured = {
        "prefill_s": [],
        "prefill_cpu_s": [],
        "compression_s": [],
        "compression_peak_growth": None,
        "compression_steps": 0,
        "prefill_peak_growth": None,
        "kv_bytes_held": held,
        "kv_bytes_allocated": allocated,
        "cache_layer_types": sorted({type(layer).__name__ for layer in cache.layers}),
        "head_lengths": None,
        "report": None,
    }
    return _figures(model, arm, arm.derived_from, measured), state
