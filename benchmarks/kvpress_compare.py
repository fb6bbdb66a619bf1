"""kvpress-mm side by side with NVIDIA kvpress 0.5.5: time and kept entries on the same model and prompt.

    bash benchmarks/setup_kvpress_env.sh             # once: kvpress in its own venv (transformers < 5.3)
    .venv/bin/python benchmarks/kvpress_compare.py --threads 1   # about 10 minutes on one core

A random-weight ``LlamaForCausalLM`` (by default the text model of benchmarks/decode.py: hidden
1024, MLP 2816, 8 layers, 16 heads, 16 KV heads, vocabulary 4096, float32) is built once and saved
with ``save_pretrained``; both sides load it from that directory. One random prompt of
``--length`` tokens (default 8192), ratio ``--ratio`` (default 0.8), greedy ``generate`` of
``--decode-tokens`` tokens. Pairs of arms (kvpress-mm in .venv, kvpress in
benchmarks/.kvpress-venv through benchmarks/kvpress_worker.py, each in a fresh process, the
order alternating between repeats):

| arm | kvpress-mm | kvpress |
|---|---|---|
| ``baseline`` | no compressor (sdpa) | no press (sdpa) |
| ``snapkv`` | ``snapkv`` window 64, kernel 5, avg pooling | ``SnapKVPress`` (its defaults: window 64, kernel 5, avg) |
| ``streaming`` | ``streaming`` 4 sink tokens | ``StreamingLLMPress`` (n_sink 4) |
| ``h2o`` | ``h2o`` without decode eviction, no window (sdpa) | ``ObservedAttentionPress`` (needs eager attention) |
| ``baseline-eager`` | - | no press (eager): what eager attention alone costs |

``--threads`` sets torch's threads on both sides. Reported: prefill time with compression (ours /
kvpress; target <= 1.0; the ratio of process CPU times with ``--threads 1``, which time slices
lost to other load on a shared machine do not inflate, else of wall times), compression time, decode
ms/token (median step; ours uses the session's GrowingLayer, kvpress transformers' DynamicLayer),
and whether the kept entries are identical (per layer and KV head) for SnapKV and StreamingLLM.
Without the kvpress venv, only kvpress-mm's side runs (and is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_common import (  # noqa: E402
    BOS,
    add_model_arguments,
    fmt,
    greedy_options,
    llama_config,
    machine_info,
    median_or_none,
    model_shape_kwargs,
    ratio_or_none,
    rounded,
)
from decode import CompressionProbe  # noqa: E402

DEFAULT_OUT = HERE / "results" / "kvpress_compare.json"
KVPRESS_VENV = HERE / ".kvpress-venv"
KVPRESS_WORKER = HERE / "kvpress_worker.py"
PREFILL_TARGET = 1.0  # (prefill + compression) ours / kvpress


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
    hidden: int = 1024
    intermediate: int = 2816
    layers: int = 8
    heads: int = 16
    kv_heads: int = 16
    vocab: int = 4096
    threads: int | None = None
    seed: int = 0
    arms: tuple[str, ...] = ("baseline", "snapkv", "streaming", "h2o", "baseline-eager")


# -- model and prompt ------------------------------------------------------------------------


def save_model_and_prompt(config: Config, directory: Path) -> tuple[Path, Path]:
    """Build the random Llama, ``save_pretrained`` it to ``directory/model``, the prompt to ``prompt.json``."""
    import transformers

    transformers.logging.set_verbosity_error()
    model_config = llama_config(config, config.length + config.decode_tokens + 16)
    torch.manual_seed(config.seed)
    model = transformers.LlamaForCausalLM(model_config).float().eval()
    model_dir = directory / "model"
    model.save_pretrained(model_dir)
    generator = torch.Generator().manual_seed(1000 + config.seed)
    ids = torch.randint(3, config.vocab, (config.length,), generator=generator)
    ids[0] = BOS
    prompt = directory / "prompt.json"
    prompt.write_text(json.dumps(ids.tolist()))
    return model_dir, prompt


# -- our side (a fresh .venv process per arm) -----------------------------------------------


def ours_worker(model_dir: Path, prompt_path: Path, settings: dict[str, Any], decode_tokens: int) -> dict[str, Any]:
    """Run kvpress-mm's arm ``settings`` on the saved model and prompt (in this process)."""
    import transformers
    from transformers import DynamicCache

    import kvpress_mm.session.context as session_module
    from kvpress_mm import Compressor

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    input_ids = torch.tensor([json.loads(prompt_path.read_text())])
    settings = dict(settings)
    strategy = settings.pop("strategy", None)
    compressor = Compressor.from_name(strategy, **settings) if strategy else None

    kept: dict[int, list[list[int]]] = {}
    recording = False
    current_cache: Any = None
    original_apply = session_module.apply_plan

    def recording_apply(layer: Any, plan: Any) -> None:
        layer_idx = next((i for i, c in enumerate(current_cache.layers) if c is layer), None)
        if recording and layer_idx is not None and layer_idx not in kept:  # the prefill's plan
            kept[layer_idx] = plan.kept_indices[0].tolist()
        original_apply(layer, plan)

    stamps: list[float] = []
    cpu: list[float] = []

    def timer(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            cpu.append(time.process_time())
        return scores

    def run(ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        nonlocal current_cache
        current_cache = DynamicCache(config=model.config)
        stamps.clear()
        cpu.clear()
        options = greedy_options(ids, new_tokens, current_cache, timer)
        with torch.inference_mode():
            cpu_start = time.process_time()
            start = time.perf_counter()
            if compressor is None:
                model.generate(ids, **options)
            else:
                with compressor(model):
                    model.generate(ids, **options)
        return start, cpu_start

    probe = CompressionProbe()
    probe.install()
    session_module.apply_plan = recording_apply
    try:
        run(input_ids[:, :256], 2)  # warm-up: lazy initialisations
        probe.reset()
        probe.active, recording = probe.available, True
        start, cpu_start = run(input_ids, decode_tokens)
        probe.active = False
    finally:
        session_module.apply_plan = original_apply
        probe.uninstall()
    return {
        "side": "ours",
        "compressor": repr(compressor),
        "prompt_length": int(input_ids.shape[1]),
        "prefill_s": stamps[0] - start,
        "prefill_cpu_s": cpu[0] - cpu_start,
        "compression_s": probe.seconds if compressor is not None else 0.0,
        "decode_step_ms": [1000 * (b - a) for a, b in zip(stamps, stamps[1:])],
        "kept": {str(k): v for k, v in sorted(kept.items())},
        "torch_threads": torch.get_num_threads(),
    }


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-4000:]}")


def run_ours(config: Config, pair: Pair, model_dir: Path, prompt: Path, scratch: Path) -> dict[str, Any]:
    """Our side of ``pair`` in a fresh .venv process."""
    out = scratch / f"ours-{pair.name}.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--ours-worker",
        json.dumps(pair.ours),
        "--model-dir",
        str(model_dir),
        "--prompt-file",
        str(prompt),
        f"--decode-tokens={config.decode_tokens}",
        f"--worker-out={out}",
    ]
    if config.threads is not None:
        command.append(f"--threads={config.threads}")
    _run(command, f"kvpress-mm worker for {pair.name!r}")
    return dict(json.loads(out.read_text()))


def kvpress_python(venv: Path = KVPRESS_VENV) -> Path | None:
    """The kvpress venv's python, if the venv exists (benchmarks/setup_kvpress_env.sh)."""
    python = venv / "bin" / "python"
    return python if python.exists() else None


def run_kvpress(
    config: Config, pair: Pair, model_dir: Path, prompt: Path, scratch: Path, python: Path
) -> dict[str, Any]:
    """kvpress's side of ``pair`` in a fresh process of its venv."""
    assert pair.kvpress is not None
    out = scratch / f"kvpress-{pair.name}.json"
    command = [
        str(python),
        str(KVPRESS_WORKER),
        f"--model-dir={model_dir}",
        f"--prompt={prompt}",
        f"--press={pair.kvpress['press']}",
        f"--ratio={config.ratio if pair.kvpress['press'] != 'none' else 0.0}",
        f"--settings={json.dumps(pair.kvpress['settings'])}",
        f"--attn={pair.kvpress['attn']}",
        f"--decode-tokens={config.decode_tokens}",
        f"--out={out}",
    ]
    if config.threads is not None:
        command.append(f"--threads={config.threads}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of .venv leaks in
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"kvpress worker for {pair.name!r} failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(out.read_text()))


# -- comparison ------------------------------------------------------------------------------


def compare_kept(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Per layer and KV head: are the kept position sets identical? And how much do they overlap?"""
    layers = sorted(set(ours) & set(theirs), key=int)
    heads = identical = 0
    differing: list[int] = []
    overlaps: list[float] = []
    for layer in layers:
        for mine, other in zip(ours[layer], theirs[layer]):
            a, b = set(mine), set(other)
            heads += 1
            identical += a == b
            differing.append(len(a ^ b) // 2)
            overlaps.append(len(a & b) / max(1, len(a | b)))
    return {
        "layers": len(layers),
        "heads": heads,
        "identical_heads": identical,
        "all_identical": heads > 0 and identical == heads and len(set(ours)) == len(set(theirs)),
        "n_kept_ours": len(ours[layers[0]][0]) if layers else None,
        "n_kept_kvpress": len(theirs[layers[0]][0]) if layers else None,
        "max_differing_entries": max(differing) if differing else None,
        "mean_jaccard": statistics.fmean(overlaps) if overlaps else None,
    }


def without_kept(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` without the runs' kept positions (``rows[*]["kept"]`` compares them), for a small JSON."""
    runs = {
        arm: {side: [{k: v for k, v in r.items() if k != "kept"} for r in results] for side, results in sides.items()}
        for arm, sides in summary["runs"].items()
    }
    return {**summary, "runs": runs}


def summarize(config: Config, runs: dict[str, dict[str, list[dict[str, Any]]]], kvpress_ran: bool) -> dict[str, Any]:
    """Medians per side and arm, ratios ours / kvpress, kept-set comparisons."""
    rows = []
    for pair in pairs(config.ratio):
        if pair.name not in config.arms:
            continue
        sides = runs.get(pair.name, {})
        row: dict[str, Any] = {"arm": pair.name, "ours_settings": pair.ours, "kvpress_settings": pair.kvpress}
        for side in ("ours", "kvpress"):
            results = sides.get(side, [])
            row[side] = {
                "prefill_s": median_or_none([r["prefill_s"] for r in results]),
                "prefill_cpu_s": median_or_none([r["prefill_cpu_s"] for r in results if "prefill_cpu_s" in r]),
                "compression_s": median_or_none([r["compression_s"] for r in results]),
                "decode_ms": median_or_none(
                    [statistics.median(r["decode_step_ms"]) for r in results if r["decode_step_ms"]]
                ),
                "runs": len(results),
            }
        row["prefill_wall_ratio"] = ratio_or_none(row["ours"]["prefill_s"], row["kvpress"]["prefill_s"])
        row["prefill_cpu_ratio"] = ratio_or_none(row["ours"]["prefill_cpu_s"], row["kvpress"]["prefill_cpu_s"])
        # one thread: process CPU time is the prefill's own work (immune to time slices lost to other load)
        cpu = config.threads == 1 and row["prefill_cpu_ratio"] is not None
        row["prefill_measure"] = "CPU time" if cpu else "wall time"
        row["prefill_ratio"] = row["prefill_cpu_ratio"] if cpu else row["prefill_wall_ratio"]
        row["decode_ratio"] = ratio_or_none(row["ours"]["decode_ms"], row["kvpress"]["decode_ms"])
        row["prefill_target_met"] = None if row["prefill_ratio"] is None else row["prefill_ratio"] <= PREFILL_TARGET
        if sides.get("ours") and sides.get("kvpress") and (pair.compare_kept or pair.name == "h2o"):
            row["kept"] = compare_kept(sides["ours"][0]["kept"], sides["kvpress"][0]["kept"])
        rows.append(row)
    versions = next((r[0]["versions"] for s in runs.values() for k, r in s.items() if k == "kvpress" and r), None)
    return {
        "benchmark": "kvpress_compare",
        "config": asdict(config),
        "machine": machine_info(source_tree=True),
        "kvpress": versions,
        "kvpress_ran": kvpress_ran,
        "rows": rows,
        "runs": runs,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The printed comparison."""
    config, machine, versions = summary["config"], summary["machine"], summary["kvpress"] or {}
    lines = [
        f"kvpress_compare: random Llama (hidden {config['hidden']}, MLP {config['intermediate']}, {config['layers']} "
        f"layers, {config['heads']} heads / {config['kv_heads']} KV heads, vocab {config['vocab']}, float32), "
        f"L={config['length']}, r={config['ratio']}, {config['decode_tokens']} decode tokens, "
        f"{config['repeats']} repeat(s), a fresh process per side and arm",
        f"kvpress-mm: torch {machine['torch']}, transformers {machine['transformers']}; kvpress "
        f"{versions.get('kvpress', '-')}: transformers {versions.get('transformers', '-')}, torch "
        f"{versions.get('torch', '-')}; {machine['torch_threads']} threads, load average at the end "
        f"{machine['load_average']}",
    ]
    if not summary["kvpress_ran"]:
        lines.append("kvpress venv not found (bash benchmarks/setup_kvpress_env.sh): kvpress-mm's side only")
    header = (
        f"{'arm':<15} {'prefill s ours':>14} {'kvpress':>8} {'ratio':>6} {'':4} {'wall':>6} {'compr s ours':>12} "
        f"{'kvpress':>8} "
        f"{'decode ms ours':>14} {'kvpress':>8} {'ratio':>6}  kept entries"
    )
    lines += ["", header, "-" * len(header)]
    for row in summary["rows"]:
        ours, theirs = row["ours"], row["kvpress"]
        met = row["prefill_target_met"]
        verdict = "" if met is None or row["arm"].startswith("baseline") else ("PASS" if met else "MISS")
        kept = row.get("kept")
        if kept is None:
            kept_text = ""
        else:
            kept_text = (
                f"{'identical' if kept['all_identical'] else 'differ'}: {kept['identical_heads']}/{kept['heads']} "
                f"heads, n_keep {kept['n_kept_ours']} / {kept['n_kept_kvpress']}, Jaccard {kept['mean_jaccard']:.3f}"
            )
        lines.append(
            f"{row['arm']:<15} {fmt(ours['prefill_s'], '14.2f')} {fmt(theirs['prefill_s'], '8.2f')} "
            f"{fmt(row['prefill_ratio'], '6.3f')} {verdict:4} {fmt(row['prefill_wall_ratio'], '6.3f')} "
            f"{fmt(ours['compression_s'], '12.3f')} "
            f"{fmt(theirs['compression_s'], '8.3f')} {fmt(ours['decode_ms'], '14.1f')} "
            f"{fmt(theirs['decode_ms'], '8.1f')} {fmt(row['decode_ratio'], '6.3f')}  {kept_text}"
        )
    lines += [
        "",
        f"prefill = start of generate to the first logits, compression included; ratio = ours / kvpress "
        f"(target <= {PREFILL_TARGET} for the compressed arms), of process CPU times with --threads 1, else of wall "
        "times; 'wall' = the wall-time ratio. h2o: ours on sdpa with the column sums computed in chunks (no "
        "[heads, L, L] tensor), "
        "kvpress's ObservedAttentionPress on eager attention (it needs the [heads, L, L] weights); its scores are "
        "normalised by each key's number of queries, ours are plain sums (H2O): different kept sets by design.",
        "decode = median step; ours decodes on the session's GrowingLayer, kvpress on DynamicLayer (torch.cat).",
    ]
    return "\n".join(lines)


def format_markdown(summary: dict[str, Any]) -> str:
    """The comparison as a Markdown table (for docs/performance.md)."""
    header = [
        "arm",
        "prefill s ours",
        "kvpress",
        "ratio",
        "compression s ours",
        "kvpress",
        "decode ms ours",
        "kvpress",
        "ratio",
        "kept entries",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "--:|" * (len(header) - 2) + "---|"]
    for row in summary["rows"]:
        ours, theirs = row["ours"], row["kvpress"]
        met = row["prefill_target_met"]
        verdict = "" if met is None or row["arm"].startswith("baseline") else (" PASS" if met else " MISS")
        kept = row.get("kept")
        kept_text = (
            ""
            if kept is None
            else f"{'identical' if kept['all_identical'] else 'differ'}: {kept['identical_heads']}/{kept['heads']} "
            f"heads, Jaccard {kept['mean_jaccard']:.3f}"
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{row['arm']}`",
                    fmt(ours["prefill_s"], ".2f"),
                    fmt(theirs["prefill_s"], ".2f"),
                    fmt(row["prefill_ratio"], ".3f") + verdict,
                    fmt(ours["compression_s"], ".3f"),
                    fmt(theirs["compression_s"], ".3f"),
                    fmt(ours["decode_ms"], ".1f"),
                    fmt(theirs["decode_ms"], ".1f"),
                    fmt(row["decode_ratio"], ".3f"),
                    kept_text,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--length", type=int, default=defaults.length)
    parser.add_argument("--ratio", type=float, default=defaults.ratio)
    parser.add_argument("--decode-tokens", type=int, default=defaults.decode_tokens)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--arms", nargs="+", default=list(defaults.arms), choices=list(defaults.arms))
    add_model_arguments(parser, defaults)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--kvpress-venv", type=Path, default=KVPRESS_VENV, help="where setup_kvpress_env.sh put it")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the saved model and prompt here")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--save-kept", action="store_true", help="keep every run's kept positions in the JSON (megabytes at 8k)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--ours-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both sides, print the table, write the JSON; returns the summary."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.ours_worker is not None:
        result = ours_worker(args.model_dir, args.prompt_file, json.loads(args.ours_worker), args.decode_tokens)
        args.worker_out.write_text(json.dumps(result))
        return result
    from tqdm import tqdm

    config = Config(
        length=args.length,
        ratio=args.ratio,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        **model_shape_kwargs(args),
        threads=args.threads,
        seed=args.seed,
        arms=tuple(args.arms),
    )
    python = kvpress_python(args.kvpress_venv)
    chosen = [p for p in pairs(config.ratio) if p.name in config.arms]
    if python is None:
        chosen = [replace(p, kvpress=None) for p in chosen]
    jobs = [(r, p, side) for r in range(config.repeats) for p in chosen for side in ("ours", "kvpress")]
    jobs = [j for j in jobs if (j[1].ours if j[2] == "ours" else j[1].kvpress) is not None]
    # alternate which side goes first from one repeat to the next
    jobs.sort(key=lambda j: (j[0], [p.name for p in chosen].index(j[1].name), (j[2] == "ours") == (j[0] % 2 == 0)))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvpress-compare-") as temp:
        work = args.work_dir or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir, prompt = save_model_and_prompt(config, work)
        bar = tqdm(jobs, desc="kvpress compare", unit="run", disable=args.quiet, file=sys.stderr)
        for _, pair, side in bar:
            bar.set_postfix_str(f"{pair.name} ({side})")
            if side == "ours":
                result = run_ours(config, pair, model_dir, prompt, work)
            else:
                assert python is not None
                result = run_kvpress(config, pair, model_dir, prompt, work, python)
            runs.setdefault(pair.name, {}).setdefault(side, []).append(result)
        bar.close()
    summary = summarize(config, runs, kvpress_ran=python is not None)
    summary["wall_seconds"] = time.perf_counter() - started
    print(format_table(summary))
    print(f"\nwall time: {summary['wall_seconds'] / 60:.1f} min")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    written = summary if args.save_kept else without_kept(summary)
    args.out.write_text(json.dumps(rounded(written), indent=1) + "\n")
    markdown = args.out.with_suffix(".md")
    markdown.write_text(format_markdown(summary))
    print(f"written: {args.out}, {markdown}")
    return summary


if __name__ == "__main__":
    main()
