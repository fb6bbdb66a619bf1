"""The command line's shared argument types and option groups (every command module uses them).

Argument types raise ``argparse.ArgumentTypeError`` with a message that names the expected form;
:class:`UsageParser` turns it into one line pointing to ``--help``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, NoReturn

from kvpress_mm.errors import UsageError

PROG = "kvpress-mm"

#: Help texts keep their line breaks (the examples in every epilog).
FORMATTER = argparse.RawDescriptionHelpFormatter


class UsageParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the command and pointing to ``--help``."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def ratio(text: str) -> float:
    """Parse a compression ratio, ``0 <= r < 1``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"the compression ratio must be in [0, 1), got {text}")
    return value


def ratio_list(text: str) -> list[float]:
    """Parse comma-separated compression ratios."""
    values = [ratio(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated ratios, e.g. 0.5,0.75,0.9")
    return list(dict.fromkeys(values))


def int_at_least(text: str, minimum: int) -> int:
    """Parse an integer of at least ``minimum``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a number of at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """Parse an integer of at least 1."""
    return int_at_least(text, 1)


def at_least_two(text: str) -> int:
    """Parse a token count of at least 2 (the first token comes from the prefill)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("expected at least 2 (the first token comes from the prefill)")
    return value


def non_negative_int(text: str) -> int:
    """Parse an integer of at least 0."""
    return int_at_least(text, 0)


def image_count(text: str) -> int:
    """Parse a number of images the reference tasks allow (1 to 16)."""
    from kvpress_mm.apps.reference.tasks import MAX_IMAGES

    value = positive_int(text)
    if value > MAX_IMAGES:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_IMAGES} images, got {value}")
    return value


def seconds(text: str) -> float:
    """Parse a positive duration in seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def name_list(text: str) -> list[str]:
    """Parse a comma-separated list of names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names, e.g. snapkv,lookm-pivotal or ALFRED,TQA")
    return list(dict.fromkeys(names))


def setting(text: str) -> tuple[str, Any]:
    """Parse a ``key=value`` strategy option."""
    from kvpress_mm.apps.run import parse_setting

    try:
        return parse_setting(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def images_list(text: str) -> list[int]:
    """Parse comma-separated image counts, each in ``1..MAX_IMAGES``."""
    from kvpress_mm.apps.reference.tasks import MAX_IMAGES

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, e.g. 8,12, got {text!r}") from None
    if not values or not all(1 <= v <= MAX_IMAGES for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated image counts in 1..{MAX_IMAGES}, got {text!r}")
    return list(dict.fromkeys(values))


def strategy_setting(text: str) -> tuple[str, str, Any]:
    """Parse ``STRATEGY.FIELD=VALUE`` (the value read as JSON, else text)."""
    try:
        target, raw = text.split("=", 1)
        strategy, key = target.split(".", 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected STRATEGY.FIELD=VALUE, e.g. snapkv.window_size=16, got {text!r}"
        ) from None
    if not strategy.strip() or not key.strip():
        raise argparse.ArgumentTypeError(f"expected STRATEGY.FIELD=VALUE, e.g. snapkv.window_size=16, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return strategy.strip(), key.strip(), value


def add_common_options(parser: argparse.ArgumentParser, json_help: str | None = "print the result as JSON") -> None:
    """``--json`` (unless ``json_help`` is None), ``--quiet`` and ``--threads``."""
    if json_help:
        parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--quiet", action="store_true", help="no progress messages or bars (errors still print)")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def add_model_options(parser: argparse.ArgumentParser, required: bool) -> None:
    """``--model``, ``--device``, ``--dtype`` and ``--no-chat-template``."""
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


def add_strategy_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--strategy``, ``--ratio`` and ``--set KEY=VALUE``."""
    parser.add_argument(
        "--strategy", required=required, metavar="NAME", help="a registered strategy name (see `strategies`)"
    )
    parser.add_argument(
        "--ratio",
        type=ratio,
        default=None,
        help="compression ratio: fraction of the prompt's cache entries removed (default: the strategy's, 0.5)",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        type=setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a strategy config option (repeatable), e.g. --set window_size=16; values are read as JSON, else text",
    )


def reference_dir(path: str) -> str:
    """``--model`` of a command that takes a reference checkpoint: a one-line usage error if it holds none."""
    from kvpress_mm.apps.models import check_model_dir

    directory = check_model_dir(path)
    if not (directory / "model.safetensors").is_file():
        raise UsageError(f"'{path}' holds no model.safetensors: not a reference checkpoint")
    return str(directory)
