"""The demo behind ``kvpress-mm demo``: one multimodal prompt, several strategies, one table.

The model is the reference VLM shipped in the package (:func:`kvpress_mm.apps.models.default_model`:
a tiny LLaVA trained on synthetic multi-image tasks, see :mod:`kvpress_mm.apps.reference`; nothing is
downloaded). The prompt is one held-out *context*: images of 2x2 coloured cells, each announced
by ``img k``, with text facts ``key K is V .`` and filler words between them.

For each strategy the demo

- compresses the context's cache and asks a few held-out questions about it on the compressed
  cache (:func:`kvpress_mm.apps.reference.questions.answer_batch`, mode ``question``): the strategy never
  sees the questions, and a trained model's answers are right or wrong, so the column says
  whether compression changed them;
- generates greedily after the context twice under compression: free-running (timed; its
  tokens are compared with the full cache's) and teacher-forced along the full cache's
  continuation (top-1 agreement and KL divergence, see :mod:`kvpress_mm.apps.bench.metrics`).

```python
from kvpress_mm.apps.demo import run_demo

result = run_demo(["full", "snapkv", "lookm-pivotal"], compression_ratio=0.8)
for row in result.rows:
    print(row.strategy, row.kv_bytes_after, row.correct, "/", len(result.questions))
```
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvpress_mm.apps.bench.metrics import fidelity
from kvpress_mm.apps.generation import generate
from kvpress_mm.apps.models import LoadedModel, default_model, image_token_count
from kvpress_mm.apps.reference.model import has_task_vocabulary
from kvpress_mm.apps.reference.questions import answer_batch
from kvpress_mm.apps.reference.render import encode_context
from kvpress_mm.apps.reference.tasks import HELDOUT_SEED, MAX_IMAGES, TASK_KINDS, TaskGenerator, TaskPrompt
from kvpress_mm.apps.tables import kib, render_table, wrap
from kvpress_mm.compressor import Compressor
from kvpress_mm.errors import UsageError
from kvpress_mm.strategies import BUILTIN_STRATEGIES

#: The strategies ``kvpress-mm demo`` runs when none are named (``full`` is the reference).
DEFAULT_STRATEGIES = BUILTIN_STRATEGIES

#: The reference strategy every other one is compared with.
REFERENCE = "full"

#: Distinct questions per task kind asked about the demo's context (fewer when the context has
#: fewer distinct ones, e.g. a single text fact).
QUESTIONS_PER_KIND = 3

NOTE = (
    "The model is the reference VLM (by default the one shipped with kvpress-mm): a tiny LLaVA trained from "
    "scratch on synthetic multi-image tasks (the colour of a cell of image k; which image has a given colour in a "
    "given cell; how many cells of image k have a colour; the value of a text fact), so its answers are right or "
    "wrong. Each strategy compresses the context's cache, then the questions are asked on the compressed cache "
    "(it never saw them): 'answers' counts the right ones. The other columns show the KV memory released, the "
    "time of a decode step, and how far the strategy moves the model's next-token distributions from the full "
    "cache's while it continues the context. One context and a handful of questions make a demonstration, not a "
    "measurement: `kvpress-mm bench accuracy` measures accuracy per strategy and ratio on hundreds of held-out "
    "prompts."
)

SHORT_NOTE = "answers: questions on one held-out context; `kvpress-mm bench accuracy` measures accuracy at scale"

LEGEND = (
    "KV before/after: the context's cache before and after compression. KV at end: after generation (h2o keeps "
    "evicting while decoding, so it stays at its budget). answers: questions answered right on the compressed "
    "cache (greedy one-token answers). top-1: teacher-forced along the full cache's continuation of the context, "
    "the fraction of decode steps whose most likely next token is the full cache's. KL: the mean "
    "KL(p_full || p_strategy) of the next-token distributions over those steps, in nats (0 = identical). greedy: "
    "the fraction of the strategy's own greedy tokens equal to the full cache's, position by position (a "
    "continuation drifts once it differs). The first generated token comes from the prefill, before compression, "
    "so it is the same everywhere and not counted. A model this small spends a decode step mostly on fixed "
    "overhead, so a smaller cache barely changes its time here."
)


@dataclass
class DemoQuestion:
    """One question asked about the demo's context.

    Attributes:
        kind: its task kind (:data:`kvpress_mm.apps.reference.tasks.TASK_KINDS`).
        text: the question's words.
        expected: the right one-word answer.

    """

    kind: str
    text: str
    expected: str


@dataclass
class DemoRow:
    """One strategy's run.

    Attributes:
        strategy: registered name.
        config: the strategy's full config (``Compressor.to_config()``).
        kv_bytes_before: KV-cache bytes of the context before compression.
        kv_bytes_after: KV-cache bytes of the context after compression.
        kv_bytes_end: KV-cache bytes when generation ends.
        decode_ms_per_token: wall time of a decode step, averaged over the steps after the first token.
        answers: the answer given to each of the result's questions, in order.
        correct: how many of them are right.
        top1_agreement: teacher-forced top-1 agreement with the full cache (decode steps).
        kl: teacher-forced mean KL divergence from the full cache, nats (decode steps).
        greedy_agreement: free-running tokens equal to the full cache's, position by position (decode steps).
        matching_prefix: free-running tokens identical to the full cache's before the first difference.
        text: the decoded free-running continuation.
        tokens: its token ids.

    """

    strategy: str
    config: dict[str, Any]
    kv_bytes_before: int
    kv_bytes_after: int
    kv_bytes_end: int
    decode_ms_per_token: float
    answers: list[str]
    correct: int
    top1_agreement: float
    kl: float
    greedy_agreement: float
    matching_prefix: int
    text: str
    tokens: list[int] = field(repr=False)

    @property
    def kept_fraction(self) -> float:
        """``kv_bytes_after / kv_bytes_before``."""
        return self.kv_bytes_after / self.kv_bytes_before if self.kv_bytes_before else 1.0


@dataclass
class DemoResult:
    """A whole demo run: the setting, the questions and one :class:`DemoRow` per strategy (``full`` first)."""

    model: str
    n_images: int
    prompt_tokens: int
    image_tokens: int
    new_tokens: int
    compression_ratio: float
    questions: list[DemoQuestion]
    rows: list[DemoRow]
    seconds: float
    note: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (with ``kept_fraction`` added to each row)."""
        data = asdict(self)
        for row, row_data in zip(self.rows, data["rows"]):
            row_data["kept_fraction"] = row.kept_fraction
        return data


def demo_prompts(n_images: int = 8, seed: int = 0, per_kind: int = QUESTIONS_PER_KIND) -> list[TaskPrompt]:
    """One held-out context of ``n_images`` images and up to ``per_kind`` distinct questions of each kind.

    Drawn from a generator seeded from :data:`~kvpress_mm.apps.reference.tasks.HELDOUT_SEED` (never used in
    training); ``seed`` picks another context.
    """
    if not 1 <= n_images <= MAX_IMAGES:
        raise ValueError(f"n_images must be in 1..{MAX_IMAGES}, got {n_images}")
    gen = TaskGenerator(seed=(HELDOUT_SEED + seed) * 1000 + n_images)
    context = gen.context(n_images)
    prompts: list[TaskPrompt] = []
    for kind in TASK_KINDS:
        seen: set[tuple[str, ...]] = set()
        for _ in range(8 * per_kind):
            if len(seen) == per_kind:
                break
            question = gen.question(context, kind)
            if question.words not in seen:
                seen.add(question.words)
                prompts.append(TaskPrompt(context, question))
    return prompts


def _answers(model: Any, compressor: Compressor, prompts: Sequence[TaskPrompt]) -> list[int]:
    """The answer token of each prompt, its context compressed first (one batch per kind: equal tail lengths)."""
    answers: dict[int, int] = {}
    for kind in TASK_KINDS:
        rows = [i for i, p in enumerate(prompts) if p.kind == kind]
        if rows:
            predicted, _ = answer_batch(model, compressor, [prompts[i] for i in rows], mode="question")
            answers.update(zip(rows, predicted))
    return [answers[i] for i in range(len(prompts))]


def run_demo(
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    compression_ratio: float = 0.5,
    n_images: int = 8,
    new_tokens: int = 32,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    loaded: LoadedModel | None = None,
    checkpoint: str | Path | None = None,
) -> DemoResult:
    """Run the reference model under each strategy on one held-out context and compare with the full cache.

    ``full`` is always run first, as the reference (added if ``strategies`` omits it). Every
    strategy is built with ``Compressor.from_name(name, compression_ratio=...)`` before
    anything runs, so a bad name or ratio fails fast.

    Args:
        strategies: registered strategy names.
        compression_ratio: fraction of the context's cache entries removed, ``0 <= r < 1``.
        n_images: images in the context (1 to 16; the shipped model was trained on up to 12).
        new_tokens: tokens generated per strategy (at least 2: the first comes from the prefill).
        seed: which held-out context (and questions).
        progress: called with a short message before each strategy runs.
        loaded: the model to use instead of :func:`~kvpress_mm.apps.models.default_model`; it must
            be a reference model (its tokenizer reads the task prompts).
        checkpoint: the reference checkpoint directory to load when ``loaded`` is not given;
            default the shipped one.

    Raises:
        kvpress_mm.errors.UnknownStrategyError: a name is not registered.
        kvpress_mm.errors.MissingCheckpointError: the checkpoint directory holds no weights.
        pydantic.ValidationError: ``compression_ratio`` is out of range.
        ValueError: ``new_tokens`` is below 2, ``n_images`` out of range, or the model is not a
            reference model.

    """
    started = time.perf_counter()
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (the first token comes from the prefill), got {new_tokens}")
    names = [REFERENCE, *dict.fromkeys(n for n in strategies if n != REFERENCE)]
    compressors = {name: Compressor.from_name(name, compression_ratio=compression_ratio) for name in names}
    prompts = demo_prompts(n_images, seed)
    if progress is not None:
        progress("loading the reference model ...")
    loaded = loaded or default_model(checkpoint)
    if not has_task_vocabulary(loaded.tokenizer):
        raise UsageError(
            f"the demo needs the reference model (its prompts use the task vocabulary); {loaded.source} is another "
            "model: try `kvpress-mm bench fidelity --model DIR` or `kvpress-mm run --model DIR`"
        )
    device = loaded.device
    inputs = {k: v.to(device) for k, v in encode_context(prompts[0].context).items()}
    generate(loaded.model, inputs, 2)  # warms up lazy imports and kernels before anything is timed

    def decode(tokens: list[int]) -> str:
        return str(loaded.tokenizer.decode(tokens, skip_special_tokens=True))

    words = {i: w for w, i in loaded.tokenizer.get_vocab().items()}  # the embedding table may be larger
    rows: list[DemoRow] = []
    reference = None
    for name, compressor in compressors.items():
        if progress is not None:
            progress(f"running {name} ...")
        free = generate(loaded.model, inputs, new_tokens, compressor, keep_logits=name == REFERENCE)
        if reference is None:
            reference = free
        assert reference.logits is not None
        if name == REFERENCE:
            forced_logits = reference.logits
        else:
            forced = generate(
                loaded.model, inputs, new_tokens, compressor, forced_tokens=reference.tokens, keep_logits=True
            )
            assert forced.logits is not None
            forced_logits = forced.logits
        scores = fidelity(reference.tokens, reference.logits, forced_logits, free.tokens)
        answers = [words.get(t, f"<id {t}>") for t in _answers(loaded.model, compressor, prompts)]
        rows.append(
            DemoRow(
                strategy=name,
                config=compressor.to_config(),
                kv_bytes_before=free.kv_bytes_before,
                kv_bytes_after=free.kv_bytes_after,
                kv_bytes_end=free.kv_bytes_end,
                decode_ms_per_token=free.decode_ms_per_token,
                answers=answers,
                correct=sum(a == p.answer for a, p in zip(answers, prompts)),
                top1_agreement=scores.top1_agreement,
                kl=scores.kl,
                greedy_agreement=scores.greedy_agreement,
                matching_prefix=scores.matching_prefix,
                text=decode(free.tokens),
                tokens=free.tokens,
            )
        )
    assert reference is not None
    return DemoResult(
        model=loaded.description,
        n_images=n_images,
        prompt_tokens=reference.prompt_length,
        image_tokens=image_token_count(loaded, inputs),
        new_tokens=new_tokens,
        compression_ratio=compression_ratio,
        questions=[DemoQuestion(p.kind, " ".join(p.question.words), p.answer) for p in prompts],
        rows=rows,
        seconds=time.perf_counter() - started,
        note=NOTE,
    )


TABLE_HEADERS = (
    "strategy",
    "KV before KiB",
    "KV after KiB",
    "kept",
    "KV at end KiB",
    "decode ms/tok",
    "answers",
    "top-1",
    "KL",
    "greedy",
)


def table(result: DemoResult) -> str:
    """The result table."""
    rows = [
        [
            row.strategy,
            kib(row.kv_bytes_before),
            kib(row.kv_bytes_after),
            f"{row.kept_fraction:.0%}",
            kib(row.kv_bytes_end),
            f"{row.decode_ms_per_token:.2f}",
            f"{row.correct}/{len(result.questions)}",
            f"{row.top1_agreement:.0%}",
            f"{row.kl:.3f}",
            f"{row.greedy_agreement:.0%}",
        ]
        for row in result.rows
    ]
    return render_table(TABLE_HEADERS, rows)


def render(result: DemoResult, quiet: bool = False) -> str:
    """The demo's screen output: the note, the setting, the table, the legend (``quiet``: table and caveat)."""
    if quiet:
        return f"{table(result)}\n({SHORT_NOTE})"
    n_text = result.prompt_tokens - result.image_tokens
    setting = (
        f"prompt: a held-out context of {result.n_images} images of 2x2 coloured cells ({result.image_tokens} image "
        f"tokens) with text facts and filler words ({n_text} text tokens) = {result.prompt_tokens} tokens; "
        f"compression ratio {result.compression_ratio:g} (each layer keeps int(L * (1 - r)) of its L entries per "
        f"KV head); greedy generation of {result.new_tokens} tokens after the context"
    )
    questions = "; ".join(f"{q.text} -> {q.expected}" for q in result.questions)
    lines = [
        wrap(f"NOTE: {result.note}"),
        wrap(f"model: {result.model}"),
        wrap(setting),
        wrap(f"questions (the right answer after each arrow): {questions}"),
    ]
    full = result.rows[0]
    wrong = [f"{q.text} -> {a}" for q, a in zip(result.questions, full.answers) if a != q.expected]
    if wrong:
        lines.append(wrap(f"the full cache already answers {len(wrong)} wrong: {'; '.join(wrong)}"))
    lines.append(wrap(f"the full cache continues the context with: {full.text}"))
    lines += ["", table(result), "", wrap(LEGEND), f"({len(result.rows)} strategies in {result.seconds:.1f} s)"]
    return "\n".join(lines)
