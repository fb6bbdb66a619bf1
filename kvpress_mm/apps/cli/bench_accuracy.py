"""``kvpress-mm bench accuracy``: answer accuracy of the reference VLM per task, strategy and ratio."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from kvpress_mm.apps.bench.accuracy import (
    DEFAULT_CONTEXTS,
    DEFAULT_IMAGES,
    DEFAULT_RATIOS,
    DEFAULT_STRATEGIES,
    DEFAULT_STRATEGY_CONFIGS,
    describe_checkpoint,
    plot,
    render_markdown,
    run_accuracy_benchmark,
)
from kvpress_mm.apps.cli.parsers import (
    FORMATTER,
    PROG,
    images_list,
    name_list,
    positive_int,
    ratio_list,
    reference_dir,
    strategy_setting,
)
from kvpress_mm.apps.reference.questions import MODES
from kvpress_mm.apps.run import compressor_from_spec
from kvpress_mm.errors import UsageError

COMMAND = f"{PROG} bench accuracy"

EPILOG = f"""The model is the tiny reference VLM shipped in kvpress_mm/apps/reference/checkpoint/ (a LLaVA trained
on synthetic multi-image tasks: lookup, retrieve, count, needle; see docs/reference-model.md), or
the checkpoint --model names. Prompts are fixed held-out sets: --contexts contexts per image count,
one question per task kind on each. "full" runs once, at ratio 0, as the reference.

Modes: "question" (default) prefills and compresses the context, then asks the question on the
compressed cache (the strategy never sees the question); "last-token" compresses all but the
prompt's last token (the question's first words are in the compressed prompt).

Writes accuracy.json, accuracy.md and accuracy.png into --output; prints the table (or the JSON).

examples:
  {COMMAND}                                          every strategy, ratios 0.5,0.8,0.9, 8 and 12 images
  {COMMAND} --strategies snapkv,h2o --ratios 0.8     two strategies at one ratio (plus full)
  {COMMAND} --images 8 --contexts 16 --quiet         a fast run
  {COMMAND} --mode last-token                        compress all but the last token (question-aware)
  {COMMAND} --set snapkv.window_size=16              override a strategy's config
  {COMMAND} --strategies pyramid:snapkv,mixkv:snapkv  wrappers around an inner strategy (outermost first)
  {COMMAND} --strategies pyramid:h2o --set pyramid:h2o.beta=10   a wrapper's option
  {COMMAND} --model ./my-checkpoint --json           another reference checkpoint; JSON on stdout
"""


def add_parser(benchmarks: Any) -> None:
    """Add ``accuracy`` to the ``bench`` subcommands ``benchmarks``."""
    accuracy = benchmarks.add_parser(
        "accuracy",
        help="task x strategy x ratio: answer accuracy of the reference VLM on held-out prompts; JSON, PNG, table",
        description="Measure how often the reference VLM still answers held-out multi-image questions right when "
        "each strategy compresses its cache, per task kind and compression ratio.",
        epilog=EPILOG,
        formatter_class=FORMATTER,
    )
    add_arguments(accuracy)
    accuracy.set_defaults(handler=command)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser`` (``kvpress-mm bench accuracy``)."""
    parser.add_argument(
        "--strategies",
        type=name_list,
        default=None,
        metavar="NAMES",
        help="comma-separated strategy names or wrapper specs (pyramid:snapkv = pyramid around snapkv, "
        "outermost first), or 'all' for every registered one (default: every built-in strategy; full is "
        "always run, as the reference)",
    )
    parser.add_argument(
        "--ratios",
        type=ratio_list,
        default=None,
        metavar="R1,R2",
        help="compression ratios (default: " + ",".join(f"{r:g}" for r in DEFAULT_RATIOS) + ")",
    )
    parser.add_argument(
        "--images",
        type=images_list,
        default=None,
        metavar="N1,N2",
        help="images per prompt, one held-out set per value (default: " + ",".join(map(str, DEFAULT_IMAGES)) + ")",
    )
    parser.add_argument(
        "--contexts",
        type=positive_int,
        default=DEFAULT_CONTEXTS,
        help=f"held-out contexts per image count, one prompt per task kind each (default: {DEFAULT_CONTEXTS})",
    )
    parser.add_argument("--mode", choices=MODES, default="question", help="what is compressed (default: question)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="prompts per prefill call (default: 16)")
    parser.add_argument(
        "--set",
        dest="settings",
        type=strategy_setting,
        action="append",
        default=[],
        metavar="STRATEGY.FIELD=VALUE",
        help="a strategy config option (repeatable; STRATEGY is a name or spec of --strategies), values read as "
        "JSON, else text (default: "
        + ", ".join(f"{s}.{k}={v}" for s, c in DEFAULT_STRATEGY_CONFIGS.items() for k, v in c.items())
        + ")",
    )
    parser.add_argument(
        "--model",
        metavar="DIR",
        default=None,
        help="a reference checkpoint directory (default: the one shipped in the package)",
    )
    parser.add_argument(
        "--output",
        default="accuracy-results",
        metavar="DIR",
        help="where accuracy.json, accuracy.md and accuracy.png go (default: accuracy-results)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw accuracy.png")
    parser.add_argument("--json", action="store_true", help="print the JSON result on stdout instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress messages or bars (errors still print)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch CPU threads (default: 1; a model this small runs fastest on one)",
    )


def command(args: argparse.Namespace) -> int:
    """Run ``kvpress-mm bench accuracy``: write the files, print the table (or JSON); returns the exit code."""
    from kvpress_mm.apps.reference.model import has_task_vocabulary, load_reference_model, require_checkpoint
    from kvpress_mm.registry import list_strategies

    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(DEFAULT_STRATEGIES) if args.strategies is None else list(args.strategies)
    if "all" in names:
        names = list_strategies()
    names = ["full", *(n for n in names if n != "full")]  # the reference runs first
    ratios = args.ratios or list(DEFAULT_RATIOS)
    configs: dict[str, dict[str, Any]] = {}
    for strategy, key, value in args.settings:
        configs.setdefault(strategy, {})[key] = value
    unknown = sorted(set(configs) - set(names))
    if unknown:
        raise UsageError(f"--set names strategy '{unknown[0]}', which this run does not include")
    for name in names:  # fail fast on unknown names and invalid configs, before loading anything
        overrides = {**DEFAULT_STRATEGY_CONFIGS.get(name, {}), **configs.get(name, {})}
        compressor_from_spec(name, 0.0 if name == "full" else ratios[0], overrides, DEFAULT_STRATEGY_CONFIGS)
    directory = Path(reference_dir(args.model)) if args.model else require_checkpoint()
    model, processor = load_reference_model(directory)
    if not has_task_vocabulary(processor.tokenizer):
        raise UsageError(f"the tokenizer in '{directory}' is not the reference model's: not a reference checkpoint")
    result = run_accuracy_benchmark(
        strategies=names,
        ratios=ratios,
        n_images=args.images or list(DEFAULT_IMAGES),
        contexts=args.contexts,
        mode=args.mode,
        batch_size=args.batch_size,
        strategy_configs=configs,
        model=model,
        progress=not args.quiet,
    )
    result.settings["model"] = describe_checkpoint(directory)
    tables = render_markdown(result)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    data = json.dumps(result.to_json(), indent=1)
    (output / "accuracy.json").write_text(data + "\n", encoding="utf-8")
    (output / "accuracy.md").write_text(tables + "\n", encoding="utf-8")
    written = [str(output / "accuracy.json"), str(output / "accuracy.md")]
    if not args.no_plot:
        written.append(str(plot(result, output / "accuracy.png")))
    if args.json:
        print(data)
        return 0
    print(tables)
    if not args.quiet:
        print(f"\n{result.seconds:.0f} s; wrote {', '.join(written)}")
    return 0
