"""``kvpress-mm run``: one generation on a local model under a strategy, with the memory it saved."""

from __future__ import annotations

import argparse
from typing import Any

from kvpress_mm.apps.cli.common import default_device, dumps, prepare_runtime, progress
from kvpress_mm.apps.cli.parsers import (
    FORMATTER,
    PROG,
    add_common_options,
    add_model_options,
    add_strategy_options,
    positive_int,
)

EPILOG = f"""Images go where the processor's image token (<image> for LLaVA) appears in the prompt, or first.
Generation is greedy and stops at end-of-sequence or after --max-new-tokens. The model directory is
read with local_files_only (write one with model.save_pretrained(dir) and processor.save_pretrained(dir)).

examples:
  {PROG} run --model ./llava --image a.png --image b.png --prompt "What changed?" --strategy lookm-pivotal --ratio 0.8
  {PROG} run --model ./llava --image a.png --prompt "<image> Describe it." --strategy snapkv --set window_size=16
  {PROG} run --model ./qwen2-0.5b --prompt "Tell me a story." --strategy streaming --set sink_tokens=4
  {PROG} run --model ./llava --image a.png --prompt "..." --strategy h2o --ratio 0.9 --json
"""


def add_parser(commands: Any) -> None:
    """Add ``run`` to the subcommands ``commands``."""
    run = commands.add_parser(
        "run",
        help="generate on a local model with images under a strategy; print the answer and the memory saved",
        description="Generate an answer with a compressed KV cache on a local model directory, with real images "
        "through the model's processor. Text-only models work too (no --image).",
        epilog=EPILOG,
        formatter_class=FORMATTER,
    )
    add_model_options(run, required=True)
    run.add_argument(
        "--image", dest="images", action="append", default=[], metavar="PATH", help="an image (repeatable)"
    )
    run.add_argument("--prompt", required=True, help="the prompt text")
    add_strategy_options(run)
    run.add_argument("--max-new-tokens", type=positive_int, default=64, help="generation limit (default: 64)")
    add_common_options(run)
    run.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    """Run ``kvpress-mm run``; returns the exit code."""
    from kvpress_mm.apps.run import render, run

    prepare_runtime(args)
    result = run(
        args.model,
        args.prompt,
        args.images,
        args.strategy,
        compression_ratio=args.ratio,
        settings=dict(args.settings),
        max_new_tokens=args.max_new_tokens,
        chat_template=not args.no_chat_template,
        device=args.device or default_device(),
        dtype=args.dtype,
        progress=None if args.json else progress(args, "run"),
    )
    if args.json:
        print(dumps(result.to_dict()))
    elif args.quiet:
        print(result.answer)
    else:
        print(render(result))
    return 0
