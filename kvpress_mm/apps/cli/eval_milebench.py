"""``kvpress-mm eval milebench``: MileBench with a compressed cache; resumable and sharded."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from kvpress_mm.apps.cli.common import default_device, dumps, prepare_runtime, progress
from kvpress_mm.apps.cli.parsers import (
    FORMATTER,
    PROG,
    add_common_options,
    add_model_options,
    add_strategy_options,
    name_list,
    positive_int,
    seconds,
)
from kvpress_mm.errors import UsageError

EPILOG = f"""Reads MileBench's on-disk format: DATA/{{name}}/{{name}}.json and DATA/{{name}}/images/ (see
kvpress_mm/apps/eval/milebench.py). Prompts are built as MileBench builds them (task instruction first,
{{image#k}} replaced by the model's image tokens, the context cut from the left to fit the window);
answers are scored as MileBench scores them (option matching -> accuracy, ROUGE-L for open-ended
answers, word match for the needle sets); results per dataset and per group go to OUTPUT/results.json
and OUTPUT/results.csv, with MileBench's own pred.json / eval.json per dataset.

Resumable: each finished sample is appended to OUTPUT/predictions/<dataset>.rank<R>.jsonl at once;
the same command run again skips finished samples. Sharded: under `accelerate launch` or `torchrun`,
process R of W (RANK / WORLD_SIZE) takes every W-th sample; process 0 waits for the others, then
merges and scores. On a CPU-only machine use `accelerate launch --multi_gpu` (its torchrun
launcher; `--cpu` alone starts a single process unless MPI is set up) or `torchrun`.

examples:
  {PROG} eval milebench --data MileBench --model ./llava --strategy lookm-pivotal --ratio 0.8 --output out/
  {PROG} eval milebench --data MileBench --datasets ALFRED,TQA --model ./llava --strategy snapkv --limit 20
  accelerate launch --multi_gpu --num_processes 2 -m kvpress_mm eval milebench \\
      --data MileBench --model ./llava --strategy h2o
  torchrun --nproc_per_node 4 -m kvpress_mm eval milebench --data MileBench --model ./llava --strategy full
  {PROG} eval milebench --data MileBench --output out/ --merge     score what out/ holds
"""


def add_parser(evaluations: Any) -> None:
    """Add ``milebench`` to the ``eval`` subcommands ``evaluations``."""
    milebench = evaluations.add_parser(
        "milebench",
        help="MileBench (multi-image long context) with a compressed cache; resumable, sharded",
        description="Evaluate a model on MileBench datasets with a compressed KV cache.",
        epilog=EPILOG,
        formatter_class=FORMATTER,
    )
    milebench.add_argument("--data", required=True, metavar="DIR", help="MileBench data directory")
    milebench.add_argument(
        "--datasets", type=name_list, default=None, metavar="NAMES", help="datasets to run (default: all under --data)"
    )
    add_model_options(milebench, required=False)
    add_strategy_options(milebench, required=False)
    milebench.add_argument("--output", default="milebench-results", metavar="DIR", help="results directory")
    milebench.add_argument(
        "--max-new-tokens", type=positive_int, default=512, help="answer length limit (default: 512, as MileBench)"
    )
    milebench.add_argument(
        "--max-context-len",
        type=positive_int,
        default=None,
        help="prompt token budget (default: the model's window - max-new-tokens - 64)",
    )
    milebench.add_argument(
        "--tokens-per-image",
        type=positive_int,
        default=None,
        help="image tokens counted per image when truncating (default: measured with the processor)",
    )
    milebench.add_argument("--limit", type=positive_int, default=None, help="only the first N samples of each dataset")
    milebench.add_argument("--merge", action="store_true", help="only merge and score the predictions OUTPUT holds")
    milebench.add_argument(
        "--merge-timeout",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="process 0: how long to wait for the other processes' samples (default: no limit)",
    )
    add_common_options(milebench, json_help="print results.json on stdout (process 0)")
    milebench.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    """Run ``kvpress-mm eval milebench``; returns the exit code."""
    from tqdm import tqdm

    from kvpress_mm.apps.eval.milebench_results import merge, table, wait_for_predictions
    from kvpress_mm.apps.eval.milebench_runner import EvalSettings, generate_shard, prepare_run, process_rank
    from kvpress_mm.apps.models import load_model, open_model_dir
    from kvpress_mm.apps.run import build_compressor

    rank, world = process_rank()
    report = progress(args, f"eval milebench{f' rank {rank}/{world}' if world > 1 else ''}")
    prepare_runtime(args)
    if args.merge:
        compressor = build_compressor(args.strategy or "full", args.ratio, dict(args.settings))
    else:
        if not args.model or not args.strategy:
            raise UsageError("--model and --strategy are required (unless --merge)")
        compressor = build_compressor(args.strategy, args.ratio, dict(args.settings))
    settings = EvalSettings(
        data_dir=args.data,
        output_dir=args.output,
        compressor=compressor,
        datasets=args.datasets,
        max_new_tokens=args.max_new_tokens,
        max_context_len=args.max_context_len,
        tokens_per_image=args.tokens_per_image,
        chat_template=not args.no_chat_template,
        limit=args.limit,
    )
    datasets = settings.selected()
    if not args.merge:
        files = open_model_dir(args.model)
        if not files.multimodal:
            raise UsageError(f"MileBench needs a vision-language model; the model in '{args.model}' is text-only")
        limits = prepare_run(settings, files, rank)
        report(f"loading {args.model} ...")
        loaded = load_model(files, device=args.device or default_device(), dtype=args.dtype)

        def bar(total: int) -> Callable[[int], Any]:
            return tqdm(
                total=total,
                desc=f"milebench rank {rank}" if world > 1 else "milebench",
                unit="sample",
                file=sys.stderr,
                disable=args.quiet or rank != 0,
                dynamic_ncols=True,
            ).update

        outcome = generate_shard(settings, loaded, datasets, limits, rank, world, progress=bar)
        report(f"{outcome.generated} sample(s) generated, {outcome.skipped} already done, in {outcome.seconds:.1f} s")
        if rank != 0:
            report("done; process 0 merges and scores")
            return 0
        if world > 1:
            report("waiting for the other processes ...")
            wait_for_predictions(args.output, datasets, timeout=args.merge_timeout)
    elif rank != 0:
        return 0
    results = merge(args.output, datasets)
    if args.json:
        print(dumps(results.to_dict()))
        return 0
    print(table(results))
    if not args.quiet:
        print(f"\nwrote {args.output}/results.json, {args.output}/results.csv and per-dataset pred.json / eval.json")
    return 0
