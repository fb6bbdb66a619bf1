"""Runs: a timed greedy ``generate``, the compression probe, a fresh process per arm."""

from __future__ import annotations

import collections
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.harness import REPO
from benchmarks.harness.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

if TYPE_CHECKING:
    import torch


def greedy_options(input_ids: torch.Tensor, new_tokens: int, **cache: Any) -> dict[str, Any]:
    """``generate`` keyword arguments: greedy decoding of exactly ``new_tokens`` tokens.

    ``cache``: the cache to fill, as ``cache=`` (transformers 5.x) or ``past_key_values=``
    (the kvpress venv's older transformers).
    """
    import torch

    return dict(
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # no early stop: every run decodes the same number of steps
        do_sample=False,
        **cache,
    )


def compression_context(compressor: Any, model: Any, **options: Any) -> contextlib.AbstractContextManager[Any]:
    """``compressor(model, **options)``, a kvpress-mm compressor's session or a kvpress press's context; a
    context that does nothing when ``compressor`` is None (an arm without compression)."""
    return contextlib.nullcontext() if compressor is None else compressor(model, **options)


class StepTimer:
    """A logits processor that timestamps every generation step, and the ``generate`` it times.

    ``generate`` calls it once per forward pass, right after the logits: the first call ends the
    prefill (it reads the process CPU time there and calls :meth:`at_prefill_end`), each later
    call ends one decode step.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.cpu = 0.0  # process CPU time at the end of the prefill
        self.start = self.cpu_start = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1:
            self.cpu = time.process_time()
            self.at_prefill_end()
        return scores

    def at_prefill_end(self) -> None:
        """Called once, right after the prefill's logits: subclasses measure the cache and memory there."""

    def generate(
        self,
        model: Any,
        input_ids: torch.Tensor,
        options: dict[str, Any],
        compressor: Any = None,
        **session_options: Any,
    ) -> tuple[Any, Any]:
        """``model.generate(input_ids, **options)`` timed by this processor, inside :func:`compression_context`.

        The clocks start before the session is entered (installing it counts in the prefill).
        Returns ``generate``'s output and the entered session (None without ``compressor``).
        """
        import torch
        from transformers import LogitsProcessorList

        self.stamps.clear()
        options = {**options, "logits_processor": LogitsProcessorList([self])}
        with torch.inference_mode():
            self.cpu_start = time.process_time()
            self.start = time.perf_counter()
            with compression_context(compressor, model, **session_options) as entered:
                output = model.generate(input_ids, **options)
        return output, entered

    @property
    def prefill_s(self) -> float:
        """Wall time from the start of ``generate`` to the prefill's logits (compression included)."""
        return self.stamps[0] - self.start

    @property
    def prefill_cpu_s(self) -> float:
        """Process CPU time of the same span."""
        return self.cpu - self.cpu_start

    @property
    def step_s(self) -> list[float]:
        """Every decode step's wall time."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


class CompressionProbe:
    """Times kvpress-mm's compression steps and their peak memory, from outside the library.

    Wraps ``CompressionSession._plan_prefill`` (the strategy's plan, inside each layer's
    attention) and ``CompressionSession._after_attention`` (the plan applied to the cache) while
    ``active``. Each step's peak RSS growth is measured from a reset high-water mark. If the
    session's internals are renamed, the probe stays unavailable and reports nothing.
    """

    def __init__(self) -> None:
        self.active = False
        self.available = False
        self.seconds = 0.0
        self.steps = 0
        self.peak_growth = 0
        self._undo: list[Any] = []

    def reset(self) -> None:
        """Start a new measurement."""
        self.seconds, self.steps, self.peak_growth = 0.0, 0, 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[CompressionProbe]:
        """The session's methods wrapped for the ``with`` block (inactive until ``active`` is set)."""
        from kvpress_mm.session import CompressionSession

        names = ("_plan_prefill", "_after_attention")
        if all(callable(getattr(CompressionSession, n, None)) for n in names):
            for name in names:
                original = getattr(CompressionSession, name)
                setattr(CompressionSession, name, self._timed(name, original))
                self._undo.append((name, original))
            self.available = True
        try:
            yield self
        finally:
            for name, original in self._undo:
                setattr(CompressionSession, name, original)
            self._undo.clear()
            self.available = False

    def _timed(self, name: str, original: Any) -> Any:
        probe = self

        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not probe.active or (name == "_after_attention" and not self._pending):
                return original(self, *args, **kwargs)
            before = rss_bytes()
            reset_peak_rss()
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                probe.seconds += time.perf_counter() - start
                probe.steps += 1
                probe.peak_growth = max(probe.peak_growth, peak_rss_bytes() - before)

        return timed


#: A worker's progress lines on stderr start with this (:func:`run_worker` passes them on).
PROGRESS = "@@progress "


def module_command(module: str, *args: str, python: Path | str = sys.executable) -> list[str]:
    """``python -m module args...``: a benchmark's worker in a fresh process (:func:`run_worker` runs it)."""
    return [str(python), "-m", module, *args]


def report_progress(text: str) -> None:
    """In a worker: one progress line for :func:`run_worker`'s ``progress``."""
    print(PROGRESS + text, file=sys.stderr, flush=True)


def run_worker(command: list[str], what: str, *, env: dict[str, str] | None = None, progress: Any = None) -> str:
    """Run ``command`` from the repository's root (so ``-m benchmarks...`` resolves); returns its stdout.

    Its stderr lines that start with :data:`PROGRESS` go to ``progress(text)`` as they come;
    the others are kept for the error raised if the process fails (``what failed: <stderr>``).
    """
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with tempfile.TemporaryFile("w+") as stdout:
        with subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) as process:
            assert process.stderr is not None
            for line in process.stderr:
                if progress is not None and line.startswith(PROGRESS):
                    progress(line[len(PROGRESS) :].strip())
                else:
                    tail.append(line)
        if process.returncode != 0:
            raise RuntimeError(f"{what} failed:\n{''.join(tail)[-4000:]}")
        stdout.seek(0)
        return stdout.read()
