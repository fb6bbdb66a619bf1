"""NVIDIA kvpress's side of kvpress_compare: runs in benchmarks/.kvpress-venv, not in .venv.

    cd <repository> && benchmarks/.kvpress-venv/bin/python -m benchmarks.kvpress_compare.kvpress_side \\
        --model-dir D --prompt P.json --press snapkv --ratio 0.8 --decode-tokens 32 --out result.json

(:func:`benchmarks.kvpress_compare.cli.run_side` runs it so, without ``PYTHONPATH``). Loads the
saved random Llama with transformers (< 5.3, what kvpress 0.5.5 supports), builds the press with
the settings kvpress_compare asks for, and runs one greedy ``generate`` inside
``with press(model):`` on the saved prompt, after a short warm-up. It writes JSON: the prefill
time (start of ``generate`` to the first logits, compression included), the time spent in the
press's ``compress`` (summed over layers), each decode step's time, and for score-based presses
the entries each layer and KV head kept (sorted positions).

It imports nothing from kvpress-mm, whose transformers is not this venv's: only
:mod:`benchmarks.harness` (the standard library at the top of its modules, torch and
transformers in the functions used here), and it fails if kvpress_mm was imported all the same.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.models import load_saved
from benchmarks.harness.reports import argument_parser
from benchmarks.harness.runs import StepTimer, greedy_options


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


def generate(model: Any, press: Any, input_ids: torch.Tensor, new_tokens: int) -> StepTimer:
    """Greedy generation inside ``press`` (None: none) into a ``DynamicCache``; the timer that timed it."""
    from transformers import DynamicCache

    timer = StepTimer()
    timer.generate(model, input_ids, greedy_options(input_ids, new_tokens, past_key_values=DynamicCache()), press)
    return timer


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one press on the saved model and prompt; write the JSON result."""
    parser = argument_parser("benchmarks.kvpress_compare.kvpress_side", __doc__)
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

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, input_ids = load_saved(args.model_dir, args.prompt, args.attn)
    press = build_press(args.press, args.ratio, json.loads(args.settings))
    recorder = Recorder(press) if press is not None else None
    generate(model, press, input_ids[:, :256], 2)  # warm-up: lazy initialisations
    if recorder is not None:
        recorder.seconds, recorder.active = 0.0, True
    timer = generate(model, press, input_ids, args.decode_tokens)
    if "kvpress_mm" in sys.modules:
        raise RuntimeError("the kvpress side imported kvpress_mm: it must run on kvpress and its transformers alone")
    result = {
        "side": "kvpress",
        "press": args.press,
        "press_repr": repr(press),
        "ratio": args.ratio,
        "attn": args.attn,
        "prompt_length": int(input_ids.shape[1]),
        "prefill_s": timer.prefill_s,
        "prefill_cpu_s": timer.prefill_cpu_s,
        "compression_s": recorder.seconds if recorder is not None else 0.0,
        "decode_step_ms": [1000 * s for s in timer.step_s],
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
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
