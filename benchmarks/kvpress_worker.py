"""NVIDIA kvpress's side of benchmarks/kvpress_compare.py: runs in benchmarks/.kvpress-venv, not in .venv.

    benchmarks/.kvpress-venv/bin/python benchmarks/kvpress_worker.py --model-dir D --prompt P.json \\
        --press snapkv --ratio 0.8 --decode-tokens 32 --out result.json

Loads the saved random Llama with transformers (< 5.3, what kvpress 0.5.5 supports), builds the
press with the settings kvpress_compare.py asks for, and runs one greedy ``generate`` inside
``with press(model):`` on the saved prompt, after a short warm-up. It writes JSON: the prefill
time (start of ``generate`` to the first logits, compression included), the time spent in the
press's ``compress`` (summed over layers), each decode step's time, and for score-based presses
the entries each layer and KV head kept (sorted positions). Imports nothing from kvpress-mm.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch


def build_press(name: str, ratio: float, settings: dict[str, Any]) -> Any:
    """The kvpress press ``name`` (``none`` = no press)."""
    import kvpress

    if name == "none":
        return None
    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio, **settings)
    if name == "streaming":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, **settings)
    if name == "observed-attention":
        return kvpress.ObservedAttentionPress(compression_ratio=ratio, **settings)
    raise ValueError(f"unknown press {name!r}")


class Recorder:
    """Wraps a press: times ``compress`` and records the kept positions computed from ``score``."""

    def __init__(self, press: Any) -> None:
        from kvpress.utils import compute_n_kept

        self.seconds = 0.0
        self.kept: dict[int, list[list[list[int]]]] = {}
        self.active = False
        compress, score = press.compress, getattr(press, "score", None)

        def timed_compress(module: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return compress(module, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        def recorded_score(module: Any, hidden_states: Any, keys: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            assert score is not None
            scores = score(module, hidden_states, keys, *args, **kwargs)
            if self.active:
                n_kept = compute_n_kept(keys.shape[2], press.compression_ratio)
                # the same top-k as ScorerPress.compress, on the same scores
                kept = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
                self.kept[int(module.layer_idx)] = kept[0].tolist()  # [kv_heads][n_kept], batch 1
            return scores

        object.__setattr__(press, "compress", timed_compress)
        if score is not None:
            object.__setattr__(press, "score", recorded_score)


class StepTimer:
    """A logits processor that timestamps every generation step (and the process CPU time at the first)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.cpu = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1:
            self.cpu = time.process_time()
        return scores


def generate(model: Any, press: Any, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float, list[float]]:
    """Greedy generation inside ``press``: (prefill seconds, prefill CPU seconds, decode step seconds)."""
    from transformers import DynamicCache, LogitsProcessorList

    timer = StepTimer()
    options: dict[str, Any] = dict(
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        past_key_values=DynamicCache(),
        logits_processor=LogitsProcessorList([timer]),
    )
    with torch.inference_mode():
        cpu_start = time.process_time()
        start = time.perf_counter()
        if press is None:
            model.generate(input_ids, **options)
        else:
            with press(model):
                model.generate(input_ids, **options)
    return timer.stamps[0] - start, timer.cpu - cpu_start, [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one press on the saved model and prompt; write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--prompt", type=Path, required=True, help="JSON list of token ids")
    parser.add_argument("--press", required=True, choices=("none", "snapkv", "streaming", "observed-attention"))
    parser.add_argument("--ratio", type=float, default=0.0)
    parser.add_argument("--settings", default="{}", help="JSON: the press's other fields")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import kvpress
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model_dir, local_files_only=True, attn_implementation=args.attn, dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    input_ids = torch.tensor([json.loads(args.prompt.read_text())])
    settings = json.loads(args.settings)

    press = build_press(args.press, args.ratio, settings)
    recorder = Recorder(press) if press is not None else None
    generate(model, press, input_ids[:, :256], 2)  # warm-up: lazy initialisations
    if recorder is not None:
        recorder.seconds, recorder.active = 0.0, True
    prefill, prefill_cpu, steps = generate(model, press, input_ids, args.decode_tokens)
    result = {
        "side": "kvpress",
        "press": args.press,
        "press_repr": repr(press),
        "ratio": args.ratio,
        "attn": args.attn,
        "prompt_length": int(input_ids.shape[1]),
        "prefill_s": prefill,
        "prefill_cpu_s": prefill_cpu,
        "compression_s": recorder.seconds if recorder is not None else 0.0,
        "decode_step_ms": [1000 * s for s in steps],
        "kept": {str(k): v for k, v in sorted(recorder.kept.items())} if recorder is not None else {},
        "versions": {
            "kvpress": getattr(kvpress, "__version__", None) or _version("kvpress"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "torch_threads": torch.get_num_threads(),
    }
    args.out.write_text(json.dumps(result))
    return result


def _version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
