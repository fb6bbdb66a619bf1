"""The fidelity benchmark behind ``kvpress-mm bench fidelity``: strategies x ratios against the full cache.

For every prompt the full cache's greedy continuation (and its raw logits) is the reference.
For every strategy and compression ratio, two greedy generations run under compression:
free-running (timed; its tokens are compared position by position) and teacher-forced along
the reference continuation (its next-token distributions are compared: top-1 agreement and
KL divergence). See :mod:`kvpress_mm.apps.bench.metrics` for the exact definitions. Results are
per prompt (:class:`FidelityRecord`) and averaged over prompts (:class:`FidelitySummary`).

Prompts are held-out task prompts for the reference VLM (:func:`reference_prompts`), the
built-in set for any other model (:func:`kvpress_mm.apps.prompts.builtin_prompts`: picture galleries
for a vision-language model, fact lists for a text model), or a file (:func:`load_prompts`).

```python
from kvpress_mm.apps.bench.fidelity import reference_prompts, run_fidelity
from kvpress_mm.apps.models import default_model

loaded = default_model()  # the reference VLM shipped in the package
result = run_fidelity(loaded, reference_prompts(count=2), ["snapkv", "h2o"], [0.5, 0.9], new_tokens=8)
for row in result.summary:
    print(row.strategy, row.compression_ratio, row.kl, row.top1_agreement)
```
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvpress_mm.apps.bench.metrics import fidelity
from kvpress_mm.apps.generation import GenerationResult, generate
from kvpress_mm.apps.models import LoadedModel, encode, load_image
from kvpress_mm.apps.prompts import Prompt
from kvpress_mm.apps.tables import json_safe, render_table
from kvpress_mm.compressor import Compressor
from kvpress_mm.errors import UsageError
from kvpress_mm.strategies import BUILTIN_STRATEGIES

DEFAULT_RATIOS = (0.5, 0.75, 0.9)

#: Every built-in strategy except ``full``, the reference.
DEFAULT_STRATEGIES = tuple(name for name in BUILTIN_STRATEGIES if name != "full")


@dataclass
class FidelityRecord:
    """One strategy at one ratio on one prompt."""

    strategy: str
    compression_ratio: float
    prompt: str
    prompt_tokens: int
    top1_agreement: float
    kl: float
    greedy_agreement: float
    matching_prefix: int
    kv_bytes_before: int
    kv_bytes_after: int
    kv_bytes_end: int
    decode_ms_per_token: float


@dataclass
class FidelitySummary:
    """One strategy at one ratio, averaged over the prompts (KV bytes summed over them)."""

    strategy: str
    compression_ratio: float
    prompts: int
    top1_agreement: float
    kl: float
    greedy_agreement: float
    kv_bytes_before: int
    kv_bytes_after: int
    decode_ms_per_token: float

    @property
    def kept_fraction(self) -> float:
        """``kv_bytes_after / kv_bytes_before``."""
        return self.kv_bytes_after / self.kv_bytes_before if self.kv_bytes_before else 1.0


@dataclass
class ReferenceRun:
    """The full cache on one prompt."""

    prompt: str
    prompt_tokens: int
    kv_bytes: int
    decode_ms_per_token: float
    text: str


@dataclass
class FidelityResult:
    """A whole benchmark run."""

    model: str
    random_weights: bool
    new_tokens: int
    strategies: list[str]
    ratios: list[float]
    references: list[ReferenceRun]
    records: list[FidelityRecord]
    summary: list[FidelitySummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``kept_fraction`` added to each summary row; NaN -> null)."""
        data = asdict(self)
        for row, row_data in zip(self.summary, data["summary"]):
            row_data["kept_fraction"] = row.kept_fraction
        return dict(json_safe(data))


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def summarize(records: Sequence[FidelityRecord]) -> list[FidelitySummary]:
    """Average ``records`` over prompts, per (strategy, ratio), in first-seen order."""
    groups: dict[tuple[str, float], list[FidelityRecord]] = {}
    for record in records:
        groups.setdefault((record.strategy, record.compression_ratio), []).append(record)
    return [
        FidelitySummary(
            strategy=strategy,
            compression_ratio=ratio,
            prompts=len(group),
            top1_agreement=_mean([r.top1_agreement for r in group]),
            kl=_mean([r.kl for r in group]),
            greedy_agreement=_mean([r.greedy_agreement for r in group]),
            kv_bytes_before=sum(r.kv_bytes_before for r in group),
            kv_bytes_after=sum(r.kv_bytes_after for r in group),
            decode_ms_per_token=_mean([r.decode_ms_per_token for r in group]),
        )
        for (strategy, ratio), group in groups.items()
    ]


def run_fidelity(
    loaded: LoadedModel,
    prompts: Sequence[Prompt],
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    new_tokens: int = 16,
    chat_template: bool = True,
    on_step: Callable[[str], None] | None = None,
) -> FidelityResult:
    """Measure every strategy at every ratio on every prompt against the full cache.

    Args:
        loaded: the model (see :mod:`kvpress_mm.apps.models`).
        prompts: the prompts.
        strategies: registered strategy names (``full`` is the reference and is skipped here).
        ratios: compression ratios, each ``0 <= r < 1``.
        new_tokens: tokens generated per run (at least 2: the first comes from the prefill).
        chat_template: apply the model's chat template, when it has one.
        on_step: called after each generation with a short label (progress bars).

    Raises:
        kvpress_mm.errors.UnknownStrategyError / pydantic.ValidationError: before anything runs.
        ValueError: ``new_tokens`` below 2, or no prompts.

    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (the first token comes from the prefill), got {new_tokens}")
    if not prompts:
        raise ValueError("no prompts to run")
    names = [name for name in dict.fromkeys(strategies) if name != "full"]
    compressors = {
        (name, ratio): Compressor.from_name(name, compression_ratio=ratio) for name in names for ratio in ratios
    }
    step = on_step or (lambda label: None)
    encoded = [encode(loaded, prompt, chat_template) for prompt in prompts]
    generate(loaded.model, encoded[0], 2)  # warm-up before anything is timed

    references: list[ReferenceRun] = []
    records: list[FidelityRecord] = []
    for prompt, inputs in zip(prompts, encoded):
        reference = generate(loaded.model, inputs, new_tokens, keep_logits=True)
        assert reference.logits is not None
        step(f"{prompt.name}: full")
        references.append(
            ReferenceRun(
                prompt=prompt.name,
                prompt_tokens=reference.prompt_length,
                kv_bytes=reference.kv_bytes_before,
                decode_ms_per_token=reference.decode_ms_per_token,
                text=str(loaded.tokenizer.decode(reference.tokens, skip_special_tokens=True)),
            )
        )
        for (name, ratio), compressor in compressors.items():
            free = generate(loaded.model, inputs, new_tokens, compressor)
            forced = generate(
                loaded.model, inputs, new_tokens, compressor, forced_tokens=reference.tokens, keep_logits=True
            )
            assert forced.logits is not None
            records.append(_record(name, ratio, prompt, reference, free, forced))
            step(f"{prompt.name}: {name} @ {ratio:g}")
    return FidelityResult(
        model=loaded.description,
        random_weights=loaded.random_weights,
        new_tokens=new_tokens,
        strategies=names,
        ratios=list(ratios),
        references=references,
        records=records,
        summary=summarize(records),
    )


def _record(
    name: str,
    ratio: float,
    prompt: Prompt,
    reference: GenerationResult,
    free: GenerationResult,
    forced: GenerationResult,
) -> FidelityRecord:
    assert reference.logits is not None and forced.logits is not None
    scores = fidelity(reference.tokens, reference.logits, forced.logits, free.tokens)
    return FidelityRecord(
        strategy=name,
        compression_ratio=ratio,
        prompt=prompt.name,
        prompt_tokens=free.prompt_length,
        top1_agreement=scores.top1_agreement,
        kl=scores.kl,
        greedy_agreement=scores.greedy_agreement,
        matching_prefix=scores.matching_prefix,
        kv_bytes_before=free.kv_bytes_before,
        kv_bytes_after=free.kv_bytes_after,
        kv_bytes_end=free.kv_bytes_end,
        decode_ms_per_token=free.decode_ms_per_token,
    )


def runs_count(n_prompts: int, strategies: Sequence[str], ratios: Sequence[float]) -> int:
    """How many ``on_step`` calls :func:`run_fidelity` makes (for a progress bar's total)."""
    names = [name for name in dict.fromkeys(strategies) if name != "full"]
    return n_prompts * (1 + len(names) * len(ratios))


# -- prompts -------------------------------------------------------------------------------


def reference_prompts(count: int = 4, seed: int = 0, n_images: int = 8) -> list[Prompt]:
    """Held-out task prompts for the reference VLM: ``count`` contexts of ``n_images`` images, one question each.

    The question kinds cycle through :data:`~kvpress_mm.apps.reference.tasks.TASK_KINDS`; the images
    are PIL images, so the prompts go through the model's processor like any others. ``seed``
    picks other contexts (all from held-out seeds, never used in training).
    """
    from kvpress_mm.apps.reference.render import to_prompt
    from kvpress_mm.apps.reference.tasks import HELDOUT_SEED, TASK_KINDS, heldout_prompts

    tasks = heldout_prompts(n_images, contexts=count, seed=HELDOUT_SEED + seed)
    per_context = len(TASK_KINDS)
    picked = [tasks[i * per_context + i % per_context] for i in range(count)]
    return [to_prompt(p, name=f"{p.kind}-{i + 1}") for i, p in enumerate(picked)]


# -- prompt files --------------------------------------------------------------------------


def load_prompts(path: str | Path, image_marker: str | None = "<image>") -> list[Prompt]:
    """Prompts from a file.

    - ``.jsonl``: one object per line, ``{"prompt": "...", "images": ["a.png"], "name": "..."}``
      (``images`` and ``name`` optional; image paths relative to the file's directory);
    - ``.json``: a list of such objects;
    - anything else: plain text, one prompt per non-empty line.

    In a prompt, each ``image_marker`` is where the next image goes; without markers the
    images come first.

    Raises:
        UsageError: the file is missing or malformed, or an image cannot be read.

    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"prompt file '{path}' does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix not in (".json", ".jsonl"):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise UsageError(f"prompt file '{path}' has no prompts")
        return [Prompt([line], name=f"prompt-{i + 1}") for i, line in enumerate(lines)]
    try:
        if file.suffix == ".json":
            items = json.loads(text)
            if not isinstance(items, list):
                raise ValueError("expected a JSON list of prompt objects")
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, ValueError) as error:
        raise UsageError(f"prompt file '{path}' is not valid {file.suffix[1:].upper()}: {error}") from None
    prompts = []
    for index, item in enumerate(items, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise UsageError(f"prompt file '{path}', entry {index}: expected an object with a 'prompt' string")
        images = [load_image(file.parent / image) for image in item.get("images") or []]
        try:
            prompt = Prompt.from_text(
                item["prompt"], images, image_marker, name=str(item.get("name", f"prompt-{index}"))
            )
        except ValueError as error:
            raise UsageError(f"prompt file '{path}', entry {index}: {error}") from None
        prompts.append(prompt)
    if not prompts:
        raise UsageError(f"prompt file '{path}' has no prompts")
    return prompts


# -- screen output -------------------------------------------------------------------------


def table(result: FidelityResult) -> str:
    """The summary table: one row per strategy and ratio."""
    headers = ["strategy", "ratio", "kept", "top-1", "KL", "greedy", "KV after KiB", "decode ms/tok"]
    rows = [
        [
            row.strategy,
            f"{row.compression_ratio:g}",
            f"{row.kept_fraction:.0%}",
            f"{row.top1_agreement:.0%}",
            f"{row.kl:.4f}",
            f"{row.greedy_agreement:.0%}",
            f"{row.kv_bytes_after / max(row.prompts, 1) / 1024:,.0f}",
            f"{row.decode_ms_per_token:.2f}",
        ]
        for row in sorted(result.summary, key=lambda r: (r.compression_ratio, r.strategy))
    ]
    full_kib = statistics.fmean(r.kv_bytes for r in result.references) / 1024 if result.references else 0.0
    full_ms = _mean([r.decode_ms_per_token for r in result.references])
    rows.insert(0, ["full", "0", "100%", "100%", "0.0000", "100%", f"{full_kib:,.0f}", f"{full_ms:.2f}"])
    return render_table(headers, rows)
