"""kvpress-mm's side of kvpress_compare: one arm on the saved model and prompt, in a fresh .venv process.

``python -m benchmarks.kvpress_compare --ours-worker SETTINGS ...`` (the command line's hidden
worker mode, :func:`benchmarks.kvpress_compare.cli.run_side`) runs :func:`ours_worker`: a warm-up
on the prompt's first 256 tokens, then the measured ``generate``. The compression time comes
from :class:`~benchmarks.harness.CompressionProbe`; the kept entries from wrapping
``kvpress_mm.session.context.apply_plan`` (each layer's first plan: the prefill's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.models import load_saved
from benchmarks.harness.runs import CompressionProbe, StepTimer, greedy_options


def ours_worker(model_dir: Path, prompt_path: Path, settings: dict[str, Any], decode_tokens: int) -> dict[str, Any]:
    """Run kvpress-mm's arm ``settings`` on the saved model and prompt (in this process)."""
    from transformers import DynamicCache

    import kvpress_mm.session.context as session_module
    from kvpress_mm import Compressor

    model, input_ids = load_saved(model_dir, prompt_path, "sdpa")
    settings = dict(settings)
    strategy = settings.pop("strategy", None)
    compressor = Compressor.from_name(strategy, **settings) if strategy else None

    kept: dict[int, list[list[int]]] = {}
    recording = False
    current_cache: Any = None
    original_apply = session_module.apply_plan

    def recording_apply(layer: Any, plan: Any, keys: Any = None, values: Any = None) -> None:
        layer_idx = next((i for i, c in enumerate(current_cache.layers) if c is layer), None)
        if recording and layer_idx is not None and layer_idx not in kept:  # the prefill's plan
            kept[layer_idx] = plan.kept_indices[0].tolist()
        original_apply(layer, plan, keys, values)

    timer = StepTimer()

    def run(ids: torch.Tensor, new_tokens: int) -> None:
        nonlocal current_cache
        current_cache = DynamicCache(config=model.config)
        timer.generate(model, ids, greedy_options(ids, new_tokens, cache=current_cache), compressor)

    with CompressionProbe().installed() as probe:
        session_module.apply_plan = recording_apply
        try:
            run(input_ids[:, :256], 2)  # warm-up: lazy initialisations
            probe.reset()
            probe.active, recording = probe.available, True
            run(input_ids, decode_tokens)
            probe.active = False
        finally:
            session_module.apply_plan = original_apply
    return {
        "side": "ours",
        "compressor": repr(compressor),
        "prompt_length": int(input_ids.shape[1]),
        "prefill_s": timer.prefill_s,
        "prefill_cpu_s": timer.prefill_cpu_s,
        "compression_s": probe.seconds if compressor is not None else 0.0,
        "decode_step_ms": [1000 * s for s in timer.step_s],
        "kept": {str(k): v for k, v in sorted(kept.items())},
        "torch_threads": torch.get_num_threads(),
    }
