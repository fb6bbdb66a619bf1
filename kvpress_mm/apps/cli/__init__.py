"""The ``kvpress-mm`` command line: argument parsing and dispatch to the command modules.

Commands: ``strategies`` (registry listing), ``demo`` (:mod:`kvpress_mm.apps.demo`), ``run``
(:mod:`kvpress_mm.apps.run`), ``bench fidelity`` (:mod:`kvpress_mm.apps.bench.fidelity`), ``bench
accuracy`` (:mod:`kvpress_mm.apps.bench.accuracy`) and ``eval milebench``
(:mod:`kvpress_mm.apps.eval.milebench_runner`). Every command has ``--help`` with
examples; those a script would read have ``--json``; ``--quiet`` silences progress. Errors
print one line on stderr and exit non-zero: 2 for a bad command line or input (unknown
strategy, invalid option, missing model directory, unreadable image), 1 for a failure.
Set ``KVPRESS_MM_TRACEBACK=1`` to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from kvpress_mm import __version__

PROG = "kvpress-mm"
TRACEBACK_ENV = "KVPRESS_MM_TRACEBACK"

MAIN_EPILOG = f"""examples:
  {PROG} strategies                 list every strategy (built-in and plugin) with its config
  {PROG} demo                       compare strategies on the shipped reference VLM (no download)
  {PROG} run --model DIR --image a.png --prompt "What is shown?" --strategy lookm-pivotal --ratio 0.8
  {PROG} bench accuracy --ratios 0.8              answer accuracy against compression, JSON + PNG
  {PROG} bench fidelity --ratios 0.5,0.9          fidelity to the full cache against compression
  {PROG} eval milebench --data DIR --model DIR --strategy snapkv --ratio 0.8
  {PROG} <command> --help           help and examples for one command
"""

STRATEGIES_EPILOG = f"""examples:
  {PROG} strategies                 one block per strategy: origin, description, config defaults
  {PROG} strategies --json          the same as a JSON list
  {PROG} strategies --json | python -c "import json,sys; print([s['name'] for s in json.load(sys.stdin)])"
"""

DEMO_EPILOG = f"""The model is the reference VLM shipped in the package: a tiny LlavaForConditionalGeneration
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

RUN_EPILOG = f"""Images go where the processor's image token (<image> for LLaVA) appears in the prompt, or first.
Generation is greedy and stops at end-of-sequence or after --max-new-tokens. The model directory is
read with local_files_only (write one with model.save_pretrained(dir) and processor.save_pretrained(dir)).

examples:
  {PROG} run --model ./llava --image a.png --image b.png --prompt "What changed?" --strategy lookm-pivotal --ratio 0.8
  {PROG} run --model ./llava --image a.png --prompt "<image> Describe it." --strategy snapkv --set window_size=16
  {PROG} run --model ./qwen2-0.5b --prompt "Tell me a story." --strategy streaming --set sink_tokens=4
  {PROG} run --model ./llava --image a.png --prompt "..." --strategy h2o --ratio 0.9 --json
"""

BENCH_EPILOG = f"""examples:
  {PROG} bench accuracy --help      answer accuracy per task, strategy and ratio on the reference VLM
  {PROG} bench fidelity --help      fidelity to the full cache (any model)
"""

FIDELITY_EPILOG = f"""For each prompt, the full cache's greedy continuation is the reference. Each strategy at each
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

EVAL_EPILOG = f"""examples:
  {PROG} eval milebench --help
"""

MILEBENCH_EPILOG = f"""Reads MileBench's on-disk format: DATA/{{name}}/{{name}}.json and DATA/{{name}}/images/ (see
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


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the command and pointing to ``--help``."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# -- argument types ------------------------------------------------------------------------


def _ratio(text: str) -> float:
    """Parse a compression ratio, ``0 <= r < 1``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"the compression ratio must be in [0, 1), got {text}")
    return value


def _ratio_list(text: str) -> list[float]:
    """Parse comma-separated compression ratios."""
    values = [_ratio(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated ratios, e.g. 0.5,0.75,0.9")
    return list(dict.fromkeys(values))


def _int_at_least(text: str, minimum: int) -> int:
    """Parse an integer of at least ``minimum``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a number of at least {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    """Parse an integer of at least 1."""
    return _int_at_least(text, 1)


def _at_least_two(text: str) -> int:
    """Parse a token count of at least 2 (the first token comes from the prefill)."""
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("expected at least 2 (the first token comes from the prefill)")
    return value


def _non_negative_int(text: str) -> int:
    """Parse an integer of at least 0."""
    return _int_at_least(text, 0)


def _image_count(text: str) -> int:
    """Parse a number of images the reference tasks allow (1 to 16)."""
    from kvpress_mm.apps.reference.tasks import MAX_IMAGES

    value = _positive_int(text)
    if value > MAX_IMAGES:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_IMAGES} images, got {value}")
    return value


def _seconds(text: str) -> float:
    """Parse a positive duration in seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _name_list(text: str) -> list[str]:
    """Parse a comma-separated list of names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names, e.g. snapkv,lookm-pivotal or ALFRED,TQA")
    return list(dict.fromkeys(names))


def _setting(text: str) -> tuple[str, Any]:
    """Parse a ``key=value`` strategy option."""
    from kvpress_mm.apps.run import parse_setting

    try:
        return parse_setting(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# -- the parser ----------------------------------------------------------------------------

_FORMATTER = argparse.RawDescriptionHelpFormatter


def _common(parser: argparse.ArgumentParser, json_help: str | None = "print the result as JSON") -> None:
    if json_help:
        parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--quiet", action="store_true", help="no progress messages or bars (errors still print)")
    parser.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def _model_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--model",
        required=required,
        metavar="DIR",
        help="local model directory (save_pretrained output with its processor or tokenizer)"
        + ("" if required else "; default: the reference VLM shipped in the package"),
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cpu, or this process's GPU)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default=None,
        help="weights dtype (default: float32 on CPU, the checkpoint's on GPU)",
    )
    parser.add_argument(
        "--no-chat-template", action="store_true", help="use the prompt as is, not wrapped in the model's chat template"
    )


def _strategy_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--strategy", required=required, metavar="NAME", help="a registered strategy name (see `strategies`)"
    )
    parser.add_argument(
        "--ratio",
        type=_ratio,
        default=None,
        help="compression ratio: fraction of the prompt's cache entries removed (default: the strategy's, 0.5)",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a strategy config option (repeatable), e.g. --set window_size=16; values are read as JSON, else text",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``kvpress-mm`` argument parser with its subcommands."""
    parser = _Parser(
        prog=PROG,
        description="KV-cache compression for Hugging Face vision-language and text models.",
        epilog=MAIN_EPILOG,
        formatter_class=_FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)

    strategies = commands.add_parser(
        "strategies",
        help="list the registered strategies (built-in and plugin)",
        description="List every registered strategy: its origin, one-line description and config defaults.",
        epilog=STRATEGIES_EPILOG,
        formatter_class=_FORMATTER,
    )
    strategies.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    strategies.set_defaults(handler=_cmd_strategies)

    demo = commands.add_parser(
        "demo",
        help="compare strategies on the shipped reference VLM with a multi-image prompt (no download)",
        description="Compress a multi-image context under several strategies on the shipped reference VLM (a tiny "
        "trained LLaVA); print KV memory before/after, whether held-out questions are still answered right, decode "
        "ms/token and fidelity to the full cache.",
        epilog=DEMO_EPILOG,
        formatter_class=_FORMATTER,
    )
    demo.add_argument(
        "--strategies",
        type=_name_list,
        default=None,
        metavar="NAMES",
        help="comma-separated strategy names, or 'all' (default: every built-in strategy)",
    )
    demo.add_argument(
        "--ratio",
        type=_ratio,
        default=0.5,
        help="compression ratio: fraction of the prompt's cache entries removed (default: 0.5; the demo's "
        "80-token context keeps 16 entries per head at 0.8, where every strategy is near chance)",
    )
    demo.add_argument(
        "--images",
        type=_image_count,
        default=8,
        help="images in the context, 1 to 16 (default: 8; the shipped model was trained on up to 12)",
    )
    demo.add_argument(
        "--new-tokens", type=_at_least_two, default=32, help="tokens generated per strategy (default: 32)"
    )
    demo.add_argument(
        "--seed", type=_non_negative_int, default=0, help="which held-out context and questions (default: 0)"
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
        type=_positive_int,
        default=1,
        help="torch CPU threads (default: 1; a model this small is fastest, and timed most steadily, on one)",
    )
    demo.set_defaults(handler=_cmd_demo)

    run = commands.add_parser(
        "run",
        help="generate on a local model with images under a strategy; print the answer and the memory saved",
        description="Generate an answer with a compressed KV cache on a local model directory, with real images "
        "through the model's processor. Text-only models work too (no --image).",
        epilog=RUN_EPILOG,
        formatter_class=_FORMATTER,
    )
    _model_options(run, required=True)
    run.add_argument(
        "--image", dest="images", action="append", default=[], metavar="PATH", help="an image (repeatable)"
    )
    run.add_argument("--prompt", required=True, help="the prompt text")
    _strategy_options(run)
    run.add_argument("--max-new-tokens", type=_positive_int, default=64, help="generation limit (default: 64)")
    _common(run)
    run.set_defaults(handler=_cmd_run)

    bench = commands.add_parser(
        "bench",
        help="benchmarks: answer accuracy on the reference VLM, fidelity to the full cache",
        epilog=BENCH_EPILOG,
        formatter_class=_FORMATTER,
    )
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="<benchmark>", parser_class=_Parser)
    bench.set_defaults(handler=lambda args: bench.error("choose a benchmark: accuracy, fidelity"))
    from kvpress_mm.apps.bench import accuracy as accuracy_bench

    accuracy = benchmarks.add_parser(
        "accuracy",
        help="task x strategy x ratio: answer accuracy of the reference VLM on held-out prompts; JSON, PNG, table",
        description="Measure how often the reference VLM still answers held-out multi-image questions right when "
        "each strategy compresses its cache, per task kind and compression ratio.",
        epilog=accuracy_bench.EPILOG,
        formatter_class=_FORMATTER,
    )
    accuracy_bench.add_arguments(accuracy)
    accuracy.set_defaults(handler=_cmd_bench_accuracy)
    fidelity = benchmarks.add_parser(
        "fidelity",
        help="strategies x ratios: top-1 agreement, KL divergence, KV bytes, decode time; JSON, PNG, table",
        description="Measure how far each strategy at each compression ratio moves a model from the full cache.",
        epilog=FIDELITY_EPILOG,
        formatter_class=_FORMATTER,
    )
    _model_options(fidelity, required=False)
    fidelity.add_argument("--prompts", metavar="FILE", help="prompt file (default: the built-in prompt set)")
    fidelity.add_argument(
        "--num-prompts", type=_positive_int, default=4, help="prompts of the built-in set to use (default: 4)"
    )
    fidelity.add_argument(
        "--strategies",
        type=_name_list,
        default=None,
        metavar="NAMES",
        help="comma-separated strategy names, or 'all' (default: every built-in strategy but full)",
    )
    fidelity.add_argument(
        "--ratios", type=_ratio_list, default=None, metavar="R1,R2", help="compression ratios (default: 0.5,0.75,0.9)"
    )
    fidelity.add_argument("--new-tokens", type=_at_least_two, default=16, help="tokens generated per run (default: 16)")
    fidelity.add_argument("--seed", type=int, default=0, help="seed of the built-in prompts (default: 0)")
    fidelity.add_argument(
        "--output", default="fidelity-results", metavar="DIR", help="where fidelity.json and fidelity.png go"
    )
    fidelity.add_argument("--no-plot", action="store_true", help="do not draw fidelity.png")
    _common(fidelity, json_help="also print the full result as JSON on stdout (instead of the table)")
    fidelity.set_defaults(handler=_cmd_bench_fidelity)

    evaluate = commands.add_parser(
        "eval", help="quality evaluations: MileBench", epilog=EVAL_EPILOG, formatter_class=_FORMATTER
    )
    evaluations = evaluate.add_subparsers(dest="evaluation", metavar="<evaluation>", parser_class=_Parser)
    evaluate.set_defaults(handler=lambda args: evaluate.error("choose an evaluation: milebench"))
    milebench = evaluations.add_parser(
        "milebench",
        help="MileBench (multi-image long context) with a compressed cache; resumable, sharded",
        description="Evaluate a model on MileBench datasets with a compressed KV cache.",
        epilog=MILEBENCH_EPILOG,
        formatter_class=_FORMATTER,
    )
    milebench.add_argument("--data", required=True, metavar="DIR", help="MileBench data directory")
    milebench.add_argument(
        "--datasets", type=_name_list, default=None, metavar="NAMES", help="datasets to run (default: all under --data)"
    )
    _model_options(milebench, required=False)
    _strategy_options(milebench, required=False)
    milebench.add_argument("--output", default="milebench-results", metavar="DIR", help="results directory")
    milebench.add_argument(
        "--max-new-tokens", type=_positive_int, default=512, help="answer length limit (default: 512, as MileBench)"
    )
    milebench.add_argument(
        "--max-context-len",
        type=_positive_int,
        default=None,
        help="prompt token budget (default: the model's window - max-new-tokens - 64)",
    )
    milebench.add_argument(
        "--tokens-per-image",
        type=_positive_int,
        default=None,
        help="image tokens counted per image when truncating (default: measured with the processor)",
    )
    milebench.add_argument("--limit", type=_positive_int, default=None, help="only the first N samples of each dataset")
    milebench.add_argument("--merge", action="store_true", help="only merge and score the predictions OUTPUT holds")
    milebench.add_argument(
        "--merge-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="process 0: how long to wait for the other processes' samples (default: no limit)",
    )
    _common(milebench, json_help="print results.json on stdout (process 0)")
    milebench.set_defaults(handler=_cmd_eval_milebench)
    return parser


# -- shared helpers ------------------------------------------------------------------------


def _progress(args: argparse.Namespace, command: str) -> Callable[[str], None]:
    def report(message: str) -> None:
        if not args.quiet:
            print(f"[{PROG} {command}] {message}", file=sys.stderr, flush=True)

    return report


def _prepare_runtime(args: argparse.Namespace) -> None:
    """Threads, and transformers' own logging and progress bars kept off our output."""
    import torch
    from transformers.utils import logging as hf_logging

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _strategy_names(requested: list[str] | None, default: Sequence[str]) -> list[str]:
    from kvpress_mm.registry import list_strategies

    if requested is None:
        return list(default)
    if "all" in requested:
        return list_strategies()
    return requested


def _default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def _dumps(data: Any) -> str:
    from kvpress_mm.apps.tables import json_safe

    return json.dumps(json_safe(data), indent=2, default=str, allow_nan=False)


# -- strategies ----------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    """A short readable name of a field's type annotation."""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _description(cls: type) -> str:
    """The first line of the class's own docstring (not an inherited one)."""
    doc = cls.__doc__
    return inspect.cleandoc(doc).splitlines()[0] if doc and doc.strip() else "(no description)"


def strategy_records() -> list[dict[str, Any]]:
    """Every registered strategy as a JSON-serialisable dict, sorted by name."""
    from kvpress_mm.registry import strategy_infos

    records = []
    for info in strategy_infos():
        fields = {}
        for name, field in info.cls.model_fields.items():
            fields[name] = {
                "type": _type_name(field.annotation),
                "default": None if field.is_required() else field.default,
                "required": field.is_required(),
                "description": field.description or "",
            }
        records.append(
            {
                "name": info.name,
                "origin": info.origin,
                "builtin": info.builtin,
                "class": f"{info.cls.__module__}.{info.cls.__qualname__}",
                "description": _description(info.cls),
                "config": fields,
            }
        )
    return records


def _cmd_strategies(args: argparse.Namespace) -> int:
    records = strategy_records()
    if args.json:
        print(json.dumps(records, indent=2, default=str))
        return 0
    for record in records:
        print(f"{record['name']}  [{record['origin']}]")
        print(f"    {record['description'].replace('``', '`')}")
        for name, field in record["config"].items():
            default = "(required)" if field["required"] else f"= {field['default']!r}"
            print(f"    {name}: {field['type']} {default}  {field['description']}".rstrip())
        print()
    builtin = sum(r["builtin"] for r in records)
    print(f"{len(records)} strategies ({builtin} built-in, {len(records) - builtin} from plugins).")
    print('Use one: Compressor.from_name("<name>", compression_ratio=0.8, ...)')
    return 0


# -- demo ----------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvpress_mm.apps.demo import DEFAULT_STRATEGIES, render, run_demo

    _prepare_runtime(args)
    result = run_demo(
        strategies=_strategy_names(args.strategies, DEFAULT_STRATEGIES),
        compression_ratio=args.ratio,
        n_images=args.images,
        new_tokens=args.new_tokens,
        seed=args.seed,
        progress=None if args.quiet or args.json else _progress(args, "demo"),
        checkpoint=_reference_dir(args.model) if args.model else None,
    )
    print(_dumps(result.to_dict()) if args.json else render(result, quiet=args.quiet))
    return 0


# -- run -----------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from kvpress_mm.apps.run import render, run

    _prepare_runtime(args)
    result = run(
        args.model,
        args.prompt,
        args.images,
        args.strategy,
        compression_ratio=args.ratio,
        settings=dict(args.settings),
        max_new_tokens=args.max_new_tokens,
        chat_template=not args.no_chat_template,
        device=args.device or _default_device(),
        dtype=args.dtype,
        progress=None if args.json else _progress(args, "run"),
    )
    if args.json:
        print(_dumps(result.to_dict()))
    elif args.quiet:
        print(result.answer)
    else:
        print(render(result))
    return 0


def _reference_dir(path: str) -> str:
    """``--model`` of a command that takes a reference checkpoint: a one-line usage error if it holds none."""
    from kvpress_mm.apps.models import check_model_dir
    from kvpress_mm.errors import UsageError

    directory = check_model_dir(path)
    if not (directory / "model.safetensors").is_file():
        raise UsageError(f"'{path}' holds no model.safetensors: not a reference checkpoint")
    return str(directory)


# -- bench accuracy ------------------------------------------------------------------------


def _cmd_bench_accuracy(args: argparse.Namespace) -> int:
    from kvpress_mm.apps.bench.accuracy import run_from_args

    _prepare_runtime(args)
    return run_from_args(args)


# -- bench fidelity ------------------------------------------------------------------------


def _cmd_bench_fidelity(args: argparse.Namespace) -> int:
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
    from kvpress_mm.errors import UsageError

    _prepare_runtime(args)
    names = _strategy_names(args.strategies, DEFAULT_STRATEGIES)
    ratios = args.ratios or list(DEFAULT_RATIOS)
    for name in names:  # fail fast on a bad name, before loading anything
        Compressor.from_name(name, compression_ratio=ratios[0])
    progress = _progress(args, "bench fidelity")
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
    progress(f"loading {args.model or 'the reference VLM'} ...")
    loaded = load_model(files, device=args.device or _default_device(), dtype=args.dtype) if files else default_model()
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
    (output / "fidelity.json").write_text(_dumps(data), encoding="utf-8")
    written = [str(output / "fidelity.json")]
    if not args.no_plot:
        from kvpress_mm.apps.bench.plot import plot_fidelity

        written.append(str(plot_fidelity(result, output / "fidelity.png")))
    if args.json:
        print(_dumps(data))
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


# -- eval milebench ------------------------------------------------------------------------


def _cmd_eval_milebench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvpress_mm.apps.eval.milebench_runner import (
        EvalSettings,
        generate_shard,
        merge,
        prepare_run,
        process_rank,
        table,
        wait_for_predictions,
    )
    from kvpress_mm.apps.models import load_model, open_model_dir
    from kvpress_mm.apps.run import build_compressor
    from kvpress_mm.errors import UsageError

    rank, world = process_rank()
    progress = _progress(args, f"eval milebench{f' rank {rank}/{world}' if world > 1 else ''}")
    _prepare_runtime(args)
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
        progress(f"loading {args.model} ...")
        loaded = load_model(files, device=args.device or _default_device(), dtype=args.dtype)

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
        progress(f"{outcome.generated} sample(s) generated, {outcome.skipped} already done, in {outcome.seconds:.1f} s")
        if rank != 0:
            progress("done; process 0 merges and scores")
            return 0
        if world > 1:
            progress("waiting for the other processes ...")
            wait_for_predictions(args.output, datasets, timeout=args.merge_timeout)
    elif rank != 0:
        return 0
    report = merge(args.output, datasets)
    if args.json:
        print(_dumps(report.to_dict()))
        return 0
    print(table(report))
    if not args.quiet:
        print(f"\nwrote {args.output}/results.json, {args.output}/results.csv and per-dataset pred.json / eval.json")
    return 0


# -- entry point ---------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    """An error as one line (a pydantic ValidationError's field errors joined)."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()]
        return f"invalid {error.title} config: " + "; ".join(parts)
    return " ".join(str(error).split()) or type(error).__name__


def _command_name(args: argparse.Namespace) -> str:
    parts = [args.command, getattr(args, "benchmark", None), getattr(args, "evaluation", None)]
    return " ".join(p for p in parts if p)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvpress-mm`` console script; returns the exit code."""
    from pydantic import ValidationError

    from kvpress_mm.errors import KVPressMMError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: strategies, demo, run, bench, eval")
    name = f"{PROG} {_command_name(args)}"
    try:
        code: int = args.handler(args)
    except (KVPressMMError, ValidationError) as error:
        print(f"{name}: error: {_one_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1
    except BrokenPipeError:  # the reader went away (`kvpress-mm strategies | head`): not an error
        sys.stdout = open(os.devnull, "w")  # keeps the interpreter's final flush quiet
        return 0
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug or an environment problem: one line, the traceback on request
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(
            f"{name}: error: {type(error).__name__}: {_one_line(error)} (set {TRACEBACK_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
