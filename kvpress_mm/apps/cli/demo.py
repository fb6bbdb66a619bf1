"""``kvpress-mm demo``: every strategy on the shipped reference VLM, side by side (no download)."""

from __future__ import annotations

import argparse
from typing import Any

from kvpress_mm.apps.cli.common import dumps, prepare_runtime, progress, strategy_names
from kvpress_mm.apps.cli.parsers import (
    FORMATTER,
    PROG,
    at_least_two,
    image_count,
    name_list,
    non_negative_int,
    positive_int,
    ratio,
    reference_dir,
)

EPILOG = f"""The model is the reference VLM shipped in the package: a tiny LlavaForConditionalGeneration
trained on synthetic multi-image tasks (nothing is downloaded; see docs/reference-model.md). The
prompt is a held-out context of images of coloured cells, text facts and filler words. Each
strategy compresses its cache; then held-out questions about it are asked on the compressed cache
("answers": how many stay right), and the model continues the context (KV memory, decode time,
fidelity to the full cache). "full" always runs first, as the reference.

examples:
  {PROG} demo                                    every built-in strategy at ratio 0.5
  {PROG} demo --ratio 0.5                        keep half of the context's cache
  {PROG} demo --strategies streaming,snapkv,h2o  only these (plus the full reference)
  {PROG} demo --strategies all                   every registered strategy, plugins included
  {PROG} demo --images 12 --seed 3               another held-out context, of 12 images
  {PROG} demo --images 2 --new-tokens 4 --quiet  a fast smoke run
  {PROG} demo --json > demo.json                 machine-readable result
"""


def add_parser(commands: Any) -> None:
    """Add ``demo`` to the subcommands ``commands``."""
    demo = commands.add_parser(
        "demo",
        help="compare strategies on the shipped reference VLM with a multi-image prompt (no download)",
        description="Compress a multi-image context under several strategies on the shipped reference VLM (a tiny "
        "trained LLaVA); print KV memory before/after, whether held-out questions are still answered right, decode "
        "ms/token and fidelity to the full cache.",
        epilog=EPILOG,
        formatter_class=FORMATTER,
    )
    demo.add_argument(
        "--strategies",
        type=name_list,
        default=None,
        metavar="NAMES",
        help="comma-separated strategy names, or 'all' (default: every built-in strategy)",
    )
    demo.add_argument(
        "--ratio",
        type=ratio,
        default=0.5,
        help="compression ratio: fraction of the prompt's cache entries removed (default: 0.5; the demo's "
        "80-token context keeps 16 entries per head at 0.8, where every strategy is near chance)",
    )
    demo.add_argument(
        "--images",
        type=image_count,
        default=8,
        help="images in the context, 1 to 16 (default: 8; the shipped model was trained on up to 12)",
    )
    demo.add_argument("--new-tokens", type=at_least_two, default=32, help="tokens generated per strategy (default: 32)")
    demo.add_argument(
        "--seed", type=non_negative_int, default=0, help="which held-out context and questions (default: 0)"
    )
    demo.add_argument(
        "--model", metavar="DIR", default=None, help="a reference checkpoint directory (default: the shipped one)"
    )
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.add_argument(
        "--quiet", action="store_true", help="no progress messages or explanations: the table and a one-line caveat"
    )
    demo.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch CPU threads (default: 1; a model this small is fastest, and timed most steadily, on one)",
    )
    demo.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    """Run ``kvpress-mm demo``; returns the exit code."""
    from kvpress_mm.apps.demo import DEFAULT_STRATEGIES, render, run_demo

    prepare_runtime(args)
    result = run_demo(
        strategies=strategy_names(args.strategies, DEFAULT_STRATEGIES),
        compression_ratio=args.ratio,
        n_images=args.images,
        new_tokens=args.new_tokens,
        seed=args.seed,
        progress=None if args.quiet or args.json else progress(args, "demo"),
        checkpoint=reference_dir(args.model) if args.model else None,
    )
    print(dumps(result.to_dict()) if args.json else render(result, quiet=args.quiet))
    return 0
