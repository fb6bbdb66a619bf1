"""The command line of ``python -m benchmarks.kvpress_compare``: the saved model and prompt, a fresh process per
side and arm, the table and the JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import benchmarks.kvpress_compare
from benchmarks.harness import REPO, RESULTS
from benchmarks.harness.models import add_model_arguments, random_llama, random_prompt
from benchmarks.harness.reports import argument_parser, config_values, rounded, write_json
from benchmarks.harness.runs import module_command, run_worker
from benchmarks.kvpress_compare.arms import Config, Pair, pairs
from benchmarks.kvpress_compare.ours import ours_worker
from benchmarks.kvpress_compare.report import format_markdown, format_table, summarize, without_kept

DEFAULT_OUT = RESULTS / "kvpress_compare.json"
KVPRESS_VENV = REPO / "benchmarks" / ".kvpress-venv"


def save_model_and_prompt(config: Config, directory: Path) -> tuple[Path, Path]:
    """Build the random Llama, ``save_pretrained`` it to ``directory/model``, the prompt to ``prompt.json``."""
    import transformers

    transformers.logging.set_verbosity_error()
    model = random_llama(config, config.length + config.decode_tokens + 16, config.seed)
    model_dir = directory / "model"
    model.save_pretrained(model_dir)
    prompt = directory / "prompt.json"
    prompt.write_text(json.dumps(random_prompt(config.vocab, config.length, config.seed)[0].tolist()))
    return model_dir, prompt


def kvpress_python(venv: Path = KVPRESS_VENV) -> Path | None:
    """The kvpress venv's python, if the venv exists (benchmarks/setup_kvpress_env.sh)."""
    python = venv.absolute() / "bin" / "python"  # not resolved: the venv's link, not the interpreter behind it
    return python if python.exists() else None


def run_side(
    config: Config, pair: Pair, side: str, model_dir: Path, prompt: Path, scratch: Path, python: Path | None
) -> dict[str, Any]:
    """One side of ``pair`` in a fresh process: ours in this interpreter's venv, kvpress in its own (``python``)."""
    out = scratch / f"{side}-{pair.name}.json"
    threads = [] if config.threads is None else [f"--threads={config.threads}"]
    if side == "ours":
        command = module_command(
            "benchmarks.kvpress_compare",
            "--ours-worker",
            json.dumps(pair.ours),
            "--model-dir",
            str(model_dir),
            "--prompt-file",
            str(prompt),
            f"--decode-tokens={config.decode_tokens}",
            f"--worker-out={out}",
            *threads,
        )
        run_worker(command, f"kvpress-mm worker for {pair.name!r}")
    else:
        assert pair.kvpress is not None and python is not None
        command = module_command(
            "benchmarks.kvpress_compare.kvpress_side",
            f"--model-dir={model_dir}",
            f"--prompt={prompt}",
            f"--press={pair.kvpress['press']}",
            f"--ratio={config.ratio if pair.kvpress['press'] != 'none' else 0.0}",
            f"--settings={json.dumps(pair.kvpress['settings'])}",
            f"--attn={pair.kvpress['attn']}",
            f"--decode-tokens={config.decode_tokens}",
            f"--out={out}",
            *threads,
            python=python,
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of .venv leaks in
        run_worker(command, f"kvpress worker for {pair.name!r}", env=env)
    return dict(json.loads(out.read_text()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see :mod:`benchmarks.kvpress_compare`)."""
    defaults = Config()
    parser = argument_parser("benchmarks.kvpress_compare", benchmarks.kvpress_compare.__doc__)
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

    config = Config(**config_values(Config, args))
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
        work = (args.work_dir or Path(temp)).absolute()  # the workers run from the repository's root
        work.mkdir(parents=True, exist_ok=True)
        model_dir, prompt = save_model_and_prompt(config, work)
        bar = tqdm(jobs, desc="kvpress compare", unit="run", disable=args.quiet, file=sys.stderr)
        for _, pair, side in bar:
            bar.set_postfix_str(f"{pair.name} ({side})")
            result = run_side(config, pair, side, model_dir, prompt, work, python)
            runs.setdefault(pair.name, {}).setdefault(side, []).append(result)
        bar.close()
    summary = summarize(config, runs, kvpress_ran=python is not None)
    summary["wall_seconds"] = time.perf_counter() - started
    print(format_table(summary))
    print(f"\nwall time: {summary['wall_seconds'] / 60:.1f} min")
    write_json(args.out, rounded(summary if args.save_kept else without_kept(summary)), indent=1)
    markdown = args.out.with_suffix(".md")
    markdown.write_text(format_markdown(summary))
    print(f"written: {args.out}, {markdown}")
    return summary
