"""The demo behind ``kvpress-mm demo``: one multimodal prompt, several strategies, one table.

The model is the default one of :func:`kvpress_mm.models.default_model` (today the embedded
random-weight tiny LLaVA of :mod:`kvpress_mm.embedded_model`; nothing is downloaded). The
prompt is a gallery of synthetic pictures, each introduced by a sentence, then a question
(:func:`kvpress_mm.prompts.gallery_prompt`); it goes through the model's own processor, so the
images become ``pixel_values`` and image placeholder tokens as with any LLaVA.

For each strategy the demo generates greedily twice under compression: free-running (timed;
its tokens are compared with the full cache's) and teacher-forced along the full cache's
continuation (its next-token distributions are compared with the full cache's: top-1
agreement and KL divergence, see :mod:`kvpress_mm.bench.metrics`).

```python
from kvpress_mm.demo import run_demo

result = run_demo(["full", "snapkv", "lookm-pivotal"], compression_ratio=0.8)
for row in result.rows:
    print(row.strategy, row.kv_bytes_after, row.kl)
```
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvpress_mm.bench.metrics import fidelity
from kvpress_mm.compressor import Compressor
from kvpress_mm.generation import generate
from kvpress_mm.models import LoadedModel, default_model, encode, image_token_count
from kvpress_mm.prompts import gallery_prompt
from kvpress_mm.tables import kib, render_table, wrap

#: The strategies ``kvpress-mm demo`` runs when none are named (``full`` is the reference).
DEFAULT_STRATEGIES = (
    "full",
    "random",
    "streaming",
    "h2o",
    "snapkv",
    "lookm-evict",
    "lookm-average",
    "lookm-pivotal",
    "lookm-weighted",
)

#: The reference strategy every other one is compared with.
REFERENCE = "full"

RANDOM_MODEL_NOTE = (
    "The model is a tiny RANDOM-WEIGHT LLaVA built in code (nothing downloaded). Its attention was given "
    "structure on purpose (q/k weights scaled up, the first token made an attention sink), so strategies differ "
    "in what they keep. The table shows the KV memory each strategy releases, the time of a decode step, and how "
    "far each strategy moves the model's next-token distributions from the full cache's. It does NOT show answer "
    "quality: the weights know nothing about the pictures, and a trained model can rank the strategies differently."
)

TRAINED_MODEL_NOTE = (
    "The table shows the KV memory each strategy releases, the time of a decode step, and how far each strategy "
    "moves the model's next-token distributions from the full cache's on one prompt: fidelity to the full cache, "
    "not accuracy on a benchmark (see `kvpress-mm eval milebench`)."
)

SHORT_NOTE = "random-weight model: memory, speed and fidelity to the full cache, NOT answer quality"

LEGEND = (
    "KV before/after: the prompt's cache before and after compression. KV at end: after generation (h2o keeps "
    "evicting while decoding, so it stays at its budget). top-1: teacher-forced along the full cache's "
    "continuation, the fraction of decode steps whose most likely next token is the full cache's. KL: the mean "
    "KL(p_full || p_strategy) of the next-token distributions over those steps, in nats (0 = identical). greedy: "
    "the fraction of the strategy's own greedy tokens equal to the full cache's, position by position (a "
    "continuation drifts once it differs). The first token comes from the prefill, before compression, so it is "
    "the same everywhere and not counted. A model this small spends a decode step mostly on fixed overhead, so "
    "a smaller cache barely changes its time here."
)


@dataclass
class DemoRow:
    """One strategy's run.

    Attributes:
        strategy: registered name.
        config: the strategy's full config (``Compressor.to_config()``).
        kv_bytes_before: KV-cache bytes of the prompt before compression.
        kv_bytes_after: KV-cache bytes of the prompt after compression.
        kv_bytes_end: KV-cache bytes when generation ends.
        decode_ms_per_token: wall time of a decode step, averaged over the steps after the first token.
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
    """A whole demo run: the setting and one :class:`DemoRow` per strategy (``full`` first)."""

    model: str
    random_weights: bool
    n_images: int
    prompt_tokens: int
    image_tokens: int
    new_tokens: int
    compression_ratio: float
    rows: list[DemoRow]
    seconds: float
    note: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (with ``kept_fraction`` added to each row)."""
        data = asdict(self)
        for row, row_data in zip(self.rows, data["rows"]):
            row_data["kept_fraction"] = row.kept_fraction
        return data


def run_demo(
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    compression_ratio: float = 0.8,
    n_images: int = 8,
    new_tokens: int = 32,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    loaded: LoadedModel | None = None,
) -> DemoResult:
    """Generate on the default model under each strategy and compare with the full cache.

    ``full`` is always run first, as the reference (added if ``strategies`` omits it). Every
    strategy is built with ``Compressor.from_name(name, compression_ratio=...)`` before
    anything runs, so a bad name or ratio fails fast.

    Args:
        strategies: registered strategy names.
        compression_ratio: fraction of the prompt's cache entries removed, ``0 <= r < 1``.
        n_images: pictures in the gallery prompt.
        new_tokens: tokens generated per strategy (at least 2: the first comes from the prefill).
        seed: seed of the model weights and of the prompt.
        progress: called with a short message before each strategy runs.
        loaded: the model to use instead of :func:`~kvpress_mm.models.default_model`.

    Raises:
        kvpress_mm.errors.UnknownStrategyError: a name is not registered.
        pydantic.ValidationError: ``compression_ratio`` is out of range.
        ValueError: ``new_tokens`` is below 2 or ``n_images`` below 1.

    """
    started = time.perf_counter()
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (the first token comes from the prefill), got {new_tokens}")
    names = [REFERENCE, *dict.fromkeys(n for n in strategies if n != REFERENCE)]
    compressors = {name: Compressor.from_name(name, compression_ratio=compression_ratio) for name in names}
    prompt = gallery_prompt(n_images=n_images, seed=seed)
    if progress is not None:
        progress("building the model ...")
    loaded = loaded or default_model(seed=seed)
    inputs = encode(loaded, prompt)
    generate(loaded.model, inputs, 2)  # warms up lazy imports and kernels before anything is timed

    def decode(tokens: list[int]) -> str:
        return str(loaded.tokenizer.decode(tokens, skip_special_tokens=True))

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
        rows.append(
            DemoRow(
                strategy=name,
                config=compressor.to_config(),
                kv_bytes_before=free.kv_bytes_before,
                kv_bytes_after=free.kv_bytes_after,
                kv_bytes_end=free.kv_bytes_end,
                decode_ms_per_token=free.decode_ms_per_token,
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
        random_weights=loaded.random_weights,
        n_images=n_images,
        prompt_tokens=reference.prompt_length,
        image_tokens=image_token_count(loaded, inputs),
        new_tokens=new_tokens,
        compression_ratio=compression_ratio,
        rows=rows,
        seconds=time.perf_counter() - started,
        note=RANDOM_MODEL_NOTE if loaded.random_weights else TRAINED_MODEL_NOTE,
    )


TABLE_HEADERS = (
    "strategy",
    "KV before KiB",
    "KV after KiB",
    "kept",
    "KV at end KiB",
    "decode ms/tok",
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
        caveat = SHORT_NOTE if result.random_weights else "fidelity to the full cache, not benchmark accuracy"
        return f"{table(result)}\n({caveat})"
    n_text = result.prompt_tokens - result.image_tokens
    setting = (
        f"prompt: {result.n_images} pictures ({result.image_tokens} image tokens) and {n_text} text tokens = "
        f"{result.prompt_tokens} tokens; greedy generation of {result.new_tokens} tokens; compression ratio "
        f"{result.compression_ratio:g} (each layer keeps int(L * (1 - r)) of its L prompt entries per KV head)"
    )
    return "\n".join(
        [
            wrap(f"NOTE: {result.note}"),
            wrap(f"model: {result.model}"),
            wrap(setting),
            "",
            table(result),
            "",
            wrap(LEGEND),
            f"({len(result.rows)} strategies in {result.seconds:.1f} s)",
        ]
    )
