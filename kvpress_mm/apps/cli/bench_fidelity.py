"""``kvpress-mm bench fidelity``: how far each strategy and ratio moves a model from the full cache."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvpress_mm.apps.cli.common import default_device, dumps, prepare_runtime, progress, strategy_names
from kvpress_mm.apps.cli.parsers import (
    FORMATTER,
    PROG,
    add_common_options,
    add_model_options,
    at_least_two,
    name_list,
    positive_int,
    ratio_list,
)
from kvpress_mm.errors import UsageError

EPILOG = f"""For each prompt, the full cache's greedy continuation is the reference. Each strategy at each
ratio is run twice: free-running (timed; "greedy" = its tokens equal to the reference's) and teacher-forced
along the reference ("top-1" = its most likely next token is the reference's; "KL" = mean
KL(p_full || p_strategy) in nats). The first token comes from the prefill (before compression) and is
not counted. Without --model the reference VLM shipped in the package is used (a tiny LLaVA trained on
synthetic multi-image tasks), with held-out task prompts; `bench accuracy` measures its answers.

prompt files (--prompts): .jsonl with one {{"prompt": "...", "images": ["a.png"], "name": "..."}} per line
(image paths relative to the file; <image> marks where each goes, else images first), .json with a
list of those, or plain text with one prompt per line.

examples:
  {PROG} bench fidelity                                   the reference VLM, held-out task prompts
  {PROG} bench fidelity --strategies snapkv,h2o --ratios 0.5,0.75,0.9 --output results/
  {PROG} bench fidelity --model ./llava --prompts prompts.jsonl --new-tokens 32
  {PROG} bench fidelity --num-prompts 2 --new-tokens 8 --quiet --json
"""


def add_parser(benchmarks: Any) -> None:
    """Add ``fidelity`` to the ``bench`` subcommands ``benchmarks``."""
    fidelity = benchmarks.add_parser(
        "fidelity",
        help="strategies x ratios: top-1 agreement, KL divergence, KV bytes, decode time; JSON, PNG, table",
        description="Measure how far each strategy at each compression ratio moves a model from the full cache.",
        epilog=EPILOG,
        formatter_class=FORMATTER,
    )
    add_model_options(fidelity, required=False)
    fidelity.add_argument("--prompts", metavar="FILE", help="prompt file (default: the built-in prompt set)")
    fidelity.add_argument(
        "--num-prompts", type=positive_int, default=4, help="prompts of the built-in set to use (default: 4)"
    )
    fidelity.add_argument(
        "--strategies",
        type=name_list,
        default=None,
        metavar="NAMES",
        help="comma-separated strategy names, or 'all' (default: every built-in strategy but full)",
    )
    fidelity.add_argument(
        "--ratios", type=ratio_list, default=None, metavar="R1,R2", help="compression ratios (default: 0.5,0.75,0.9)"
    )
    fidelity.add_argument("--new-tokens", type=at_least_two, default=16, help="tokens generated per run (default: 16)")
    fidelity.add_argument("--seed", type=int, default=0, help="seed of the built-in prompts (default: 0)")
    fidelity.add_argument(
        "--output", default="fidelity-results", metavar="DIR", help="where fidelity.json and fidelity.png go"
    )
    fidelity.add_argument("--no-plot", action="store_true", help="do not draw fidelity.png")
    add_common_options(fidelity, json_help="also print the full result as JSON on stdout (instead of the table)")
    fidelity.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    """Run ``kvpress-mm bench fidelity``; returns the exit code."""
    from pathlib import Path

    from tqdm import tqdm

    from kvpress_mm.apps.bench.fidelity import (
        DEFAULT_RATIOS,
        DEFAULT_STRATEGIES,
        load_prompts,
        reference_prompts,
        run_fidelity,
        runs_count,
    )
    from kvpress_mm.apps.bench.fidelity import table as fidelity_table
    from kvpress_mm.apps.models import default_model, load_model, open_model_dir
    from kvpress_mm.apps.prompts import builtin_prompts
    from kvpress_mm.apps.reference.model import has_task_vocabulary
    from kvpress_mm.apps.tables import wrap
    from kvpress_mm.compressor import Compressor

    prepare_runtime(args)
    names = strategy_names(args.strategies, DEFAULT_STRATEGIES)
    ratios = args.ratios or list(DEFAULT_RATIOS)
    for name in names:  # fail fast on a bad name, before loading anything
        Compressor.from_name(name, compression_ratio=ratios[0])
    report = progress(args, "bench fidelity")
    files = open_model_dir(args.model) if args.model else None
    multimodal = files.multimodal if files is not None else True  # the reference VLM is a LLaVA
    reference = files is None or has_task_vocabulary(files.tokenizer)  # it reads task prompts only
    if args.prompts:
        marker = (files.image_token if files is not None else None) or "<image>"
        prompts = load_prompts(args.prompts, marker)
        if not multimodal and any(prompt.images for prompt in prompts):
            raise UsageError(f"the prompt file has images but the model in '{args.model}' is text-only")
    elif reference:
        prompts = reference_prompts(count=args.num_prompts, seed=args.seed)
    else:
        prompts = builtin_prompts(multimodal, count=args.num_prompts, seed=args.seed)
    report(f"loading {args.model or 'the reference VLM'} ...")
    loaded = load_model(files, device=args.device or default_device(), dtype=args.dtype) if files else default_model()
    with tqdm(
        total=runs_count(len(prompts), names, ratios),
        desc="fidelity",
        unit="run",
        file=sys.stderr,
        disable=args.quiet,
        dynamic_ncols=True,
    ) as bar:

        def step(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

        result = run_fidelity(
            loaded, prompts, names, ratios, args.new_tokens, chat_template=not args.no_chat_template, on_step=step
        )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    (output / "fidelity.json").write_text(dumps(data), encoding="utf-8")
    written = [str(output / "fidelity.json")]
    if not args.no_plot:
        from kvpress_mm.apps.bench.plot import plot_fidelity

        written.append(str(plot_fidelity(result, output / "fidelity.png")))
    if args.json:
        print(dumps(data))
        return 0
    if not args.quiet:
        if result.random_weights:
            print(wrap("NOTE: RANDOM-WEIGHT model: fidelity to the full cache, NOT answer quality."))
        elif reference and not args.prompts:
            print(
                wrap(
                    "NOTE: the reference VLM on held-out task prompts: fidelity to the full cache along its "
                    "continuation; `kvpress-mm bench accuracy` measures whether its answers stay right."
                )
            )
        print(wrap(f"model: {result.model}"))
        print(f"{len(prompts)} prompt(s), {result.new_tokens} tokens each; means over prompts:\n")
    print(fidelity_table(result))
    if not args.quiet:
        print(f"\nwrote {', '.join(written)}")
    return 0
