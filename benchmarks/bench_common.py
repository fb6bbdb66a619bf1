"""Helpers shared by the benchmark scripts (decode.py, prefill_decode.py, kvpress_compare.py).

The scripts run as ``python benchmarks/<name>.py``, so this directory is ``sys.path[0]`` and they
import this module as a sibling: ``from bench_common import ...``. It imports only the standard
library at the top: torch, transformers and kvpress_mm are imported inside the functions that
need them, as the scripts do, so that ``--help`` stays fast and a worker process pays only for
what it uses.

- memory: the resident set and its kernel high-water mark (``/proc/self/status``, reset with
  ``/proc/self/clear_refs``), ``ru_maxrss`` where those are unavailable, and glibc's allocator
  settings that make RSS growth measure what a step needs;
- the random text model: the ``LlamaConfig`` of a benchmark's model shape, and its command-line
  options;
- greedy ``generate`` options with a step timer;
- the machine a run measured on, and the summaries' small formatting helpers.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import argparse

    import torch

#: Special token ids of the random models: padding, beginning and end of sequence.
PAD, BOS, EOS = 0, 1, 2

# glibc: every allocation above 128 KiB is its own mapping, returned to the system when freed, so the
# resident set follows the live tensors and the RSS growth of a step measures what it needs (with the
# default adaptive threshold, freed chunks linger in the heap and the high-water mark varies by +-100 MiB
# between identical runs). Set in the environment of the worker processes, before glibc reads it.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


# -- memory ----------------------------------------------------------------------------------


def status_kib(name: str) -> int | None:
    """A field of /proc/self/status in KiB (``VmRSS``, ``VmHWM``), None where unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:  # not Linux: the callers fall back (ru_maxrss) or report 0
        return None
    return None


def rss_bytes() -> int:
    """Resident set size now (0 where /proc/self/status is unavailable)."""
    return (status_kib("VmRSS") or 0) * 1024


def peak_rss_bytes() -> int:
    """Resident set high-water mark since the last :func:`reset_peak_rss` (0 where unavailable)."""
    return (status_kib("VmHWM") or 0) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return False
    return True


def ru_maxrss_bytes() -> int:
    """The process's lifetime peak RSS from ``getrusage`` (cannot be reset: the fallback of :func:`peak_rss_bytes`)."""
    import resource  # Unix only: imported here so that importing this module works everywhere

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


# -- the random text model -------------------------------------------------------------------


class ModelShape(Protocol):
    """The text model's shape, as every benchmark's ``Config`` holds it.

    Read-only ints (properties, so that frozen dataclasses match): vocabulary size, hidden size,
    MLP size, decoder layers, query heads, key-value heads.
    """

    @property
    def vocab(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @property
    def intermediate(self) -> int: ...
    @property
    def layers(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def kv_heads(self) -> int: ...


#: The options of :func:`add_model_arguments`, in the order ``--help`` lists them.
MODEL_SHAPE_FIELDS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")


def llama_config(shape: ModelShape, max_positions: int) -> Any:
    """The ``transformers.LlamaConfig`` of ``shape`` (pad, BOS and EOS ids 0, 1, 2), ``max_positions`` long."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def add_model_arguments(parser: argparse.ArgumentParser, defaults: ModelShape | None) -> None:
    """``--hidden``, ``--intermediate``, ``--layers``, ``--heads``, ``--kv-heads``, ``--vocab`` (ints).

    Their defaults come from ``defaults``; with ``None`` they default to ``None`` (decode.py: an
    option given overrides its ``--quick`` or full-run value, one not given keeps it).
    """
    for name in MODEL_SHAPE_FIELDS:
        default = None if defaults is None else getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)


def model_shape_kwargs(args: argparse.Namespace) -> dict[str, int]:
    """The options of :func:`add_model_arguments` as keyword arguments of a ``Config``."""
    return {name: getattr(args, name) for name in MODEL_SHAPE_FIELDS}


def greedy_options(
    input_ids: torch.Tensor,
    new_tokens: int,
    cache: Any,
    timer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, Any]:
    """``generate`` keyword arguments: greedy decoding of exactly ``new_tokens`` tokens into ``cache``.

    ``timer`` is the only logits processor: ``generate`` calls it once per forward pass, right
    after the logits (the first call ends the prefill), which is where the scripts timestamp steps.
    """
    import torch
    from transformers import LogitsProcessorList

    return dict(
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # no early stop: every run decodes the same number of steps
        do_sample=False,
        cache=cache,
        logits_processor=LogitsProcessorList([timer]),
    )


# -- summaries -------------------------------------------------------------------------------


def source_revision(directory: Path) -> str:
    """The git commit of the source tree at ``directory`` (``+modified`` if it has changes), else ``unknown``.

    What ran, without the machine's path (results are committed to the docs).
    """
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+modified" if changes else commit


def machine_info(*, source_tree: bool = False, interop_threads: bool = False) -> dict[str, Any]:
    """Versions, threads and load: what the times depend on.

    ``source_tree`` adds ``kvpress_mm``, the git commit of the kvpress_mm that ran
    (:func:`source_revision`), first; ``interop_threads`` adds ``torch_interop_threads`` after
    ``torch_threads``. The two options keep each script's JSON as it was (decode.py and
    kvpress_compare.py report the source tree, prefill_decode.py the inter-op threads).
    """
    import torch
    import transformers

    info: dict[str, Any] = {}
    if source_tree:
        import kvpress_mm

        info["kvpress_mm"] = source_revision(Path(kvpress_mm.__file__).parent)
    info.update(
        python=platform.python_version(),
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        torch_threads=torch.get_num_threads(),
    )
    if interop_threads:
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    # read last: the load average at the end of the run, what it was measured under
    info["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return info


def median_or_none(values: list[float]) -> float | None:
    """The median of ``values``, None when there are none (an arm that did not run)."""
    return statistics.median(values) if values else None


def ratio_or_none(a: float | None, b: float | None) -> float | None:
    """``a / b``, None when either is missing or ``b`` is 0."""
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str, *, align_dash: bool = False) -> str:
    """``value`` formatted with ``spec``, or a dash when it is missing.

    ``align_dash``: the dash right-aligned to the spec's width (``"8.1f"``: 8 characters), so that
    fixed-width table columns stay aligned; otherwise a bare ``-`` (Markdown cells, free text).
    """
    if value is None:
        width = spec.split(".")[0]
        return format("-", ">" + width) if align_dash and width.isdigit() else "-"
    return format(value, spec)


def rounded(value: Any, digits: int = 5) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (a smaller JSON file)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value
