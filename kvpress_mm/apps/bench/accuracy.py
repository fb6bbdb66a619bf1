"""Accuracy vs compression on the reference VLM: accuracy per task kind x strategy x compression ratio.

The shipped reference model (:mod:`kvpress_mm.apps.reference`) answers one-token questions about
multi-image prompts. Each held-out prompt is split in two
(:mod:`kvpress_mm.apps.reference.questions`):

- ``--mode question`` (default, question-agnostic): the *context* (images, facts, fillers) is
  prefilled under the compressor and compressed; the *question* is then run on the compressed
  cache, and its last position's greedy token is the answer. The strategy never sees the
  question when it chooses what to keep: the cache must keep what any question may need.
- ``--mode last-token`` (question-aware): everything but the prompt's last token is prefilled and
  compressed (the question's first words are in the prompt, so window-based strategies see them),
  then the last token is decoded on the compressed cache.

In both modes the answer is computed by attention over the *compressed* cache. (A plain
``model.generate(**inputs, max_new_tokens=1)`` would not measure anything: its one token comes
from the prefill forward, which attends to the full prompt before the cache is compressed.)

```bash
kvpress-mm bench accuracy                          # every strategy, ratios 0.5,0.8,0.9, 8 and 12 images
kvpress-mm bench accuracy --strategies snapkv,h2o --ratios 0.8 --contexts 16
kvpress-mm bench accuracy --json > accuracy.json   # machine-readable result on stdout
```

```python
from kvpress_mm.apps.bench.accuracy import format_table, run_accuracy_benchmark

result = run_accuracy_benchmark(strategies=["full", "snapkv"], ratios=[0.8], contexts=8)
print(format_table(result))
```
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvpress_mm.apps.reference.questions import MODES, answer_batch
from kvpress_mm.apps.reference.render import word_ids
from kvpress_mm.apps.reference.tasks import HELDOUT_SEED, TASK_KINDS, heldout_prompts
from kvpress_mm.apps.run import compressor_from_spec
from kvpress_mm.strategies import BUILTIN_STRATEGIES

#: Strategies run when none are named (``full`` is the reference, run once at ratio 0).
DEFAULT_STRATEGIES: tuple[str, ...] = BUILTIN_STRATEGIES
# how results name the reference model shipped in the package
SHIPPED_CHECKPOINT = "kvpress_mm/apps/reference/checkpoint (shipped)"
#: Compression ratios run when none are given.
DEFAULT_RATIOS: tuple[float, ...] = (0.5, 0.8, 0.9)
#: Images per prompt of the held-out sets when none are given.
DEFAULT_IMAGES: tuple[int, ...] = (8, 12)
#: Contexts per image count (each gives one prompt per task kind).
DEFAULT_CONTEXTS = 64
#: Config overrides for the short prompts of this benchmark (about 60 to 115 tokens with 8 to 12
#: images): SnapKV's default 32-query observation window would be a third of the prompt or more,
#: and at ratio >= 0.8 more than its whole budget, turning it into "keep the most recent entries".
DEFAULT_STRATEGY_CONFIGS: dict[str, dict[str, Any]] = {"snapkv": {"window_size": 8}}


@dataclass(frozen=True)
class AccuracyCell:
    """Accuracy of one strategy at one ratio on one task kind and image count.

    Attributes:
        strategy: registered strategy name.
        compression_ratio: fraction of the prefilled cache removed (0 for ``full``).
        n_images: images per prompt.
        kind: task kind.
        correct: prompts answered right.
        total: prompts asked.
        kept_fraction: mean fraction of the prefilled entries kept (per layer and KV head).

    """

    strategy: str
    compression_ratio: float
    n_images: int
    kind: str
    correct: int
    total: int
    kept_fraction: float

    @property
    def accuracy(self) -> float:
        """``correct / total``."""
        return self.correct / self.total if self.total else float("nan")


@dataclass
class AccuracyResult:
    """Everything a benchmark run measured, plus what it ran on."""

    cells: list[AccuracyCell] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def accuracy(self, strategy: str, ratio: float, kind: str, n_images: int | None = None) -> float:
        """Accuracy of ``strategy`` at ``ratio`` on ``kind``, pooled over image counts unless one is given."""
        cells = [
            c
            for c in self.cells
            if c.strategy == strategy
            and c.compression_ratio == ratio
            and c.kind == kind
            and (n_images is None or c.n_images == n_images)
        ]
        total = sum(c.total for c in cells)
        return sum(c.correct for c in cells) / total if total else float("nan")

    def arms(self) -> list[tuple[str, float]]:
        """The (strategy, ratio) pairs measured, in run order."""
        seen: dict[tuple[str, float], None] = {}
        for c in self.cells:
            seen.setdefault((c.strategy, c.compression_ratio), None)
        return list(seen)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict: settings, seconds, and one record per cell (with its accuracy)."""
        return {
            "settings": self.settings,
            "seconds": round(self.seconds, 2),
            "cells": [{**asdict(c), "accuracy": round(c.accuracy, 4)} for c in self.cells],
        }


def describe_checkpoint(path: str | Path | None) -> str:
    """The checkpoint for the results: the shipped one by name (no machine path), else as given."""
    from kvpress_mm.apps.reference.model import CHECKPOINT_DIR

    if path is None or Path(path).resolve() == CHECKPOINT_DIR.resolve():
        return SHIPPED_CHECKPOINT
    return str(path)


def run_accuracy_benchmark(
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    n_images: Sequence[int] = DEFAULT_IMAGES,
    contexts: int = DEFAULT_CONTEXTS,
    mode: str = "question",
    batch_size: int = 16,
    strategy_configs: dict[str, dict[str, Any]] | None = None,
    model: Any = None,
    checkpoint: str | Path | None = None,
    seed: int = HELDOUT_SEED,
    progress: bool = True,
    on_cell: Callable[[AccuracyCell], None] | None = None,
) -> AccuracyResult:
    """Measure accuracy per task kind x strategy x ratio on fixed held-out prompts.

    Args:
        strategies: registered strategy names, or wrapper specs (``"pyramid:snapkv"`` is
            ``pyramid`` around ``snapkv``, see ``kvpress_mm.apps.run.compressor_from_spec``);
            ``full`` runs once (ratio 0) as the reference.
        ratios: compression ratios of the other strategies.
        n_images: images per prompt; one held-out set per value.
        contexts: contexts per image count; each gives one prompt per task kind.
        mode: ``"question"`` (compress the context, then ask) or ``"last-token"`` (compress all
            but the prompt's last token); see the module docstring.
        batch_size: prompts per prefill call (rows are left-padded; 1 runs them one by one).
        strategy_configs: extra config per strategy name or spec (the spec's outermost
            strategy), applied over :data:`DEFAULT_STRATEGY_CONFIGS`, which apply to every level
            of a spec.
        model: a loaded reference model; default: loaded from ``checkpoint`` with
            :func:`kvpress_mm.apps.reference.load_reference_model`.
        checkpoint: the checkpoint directory to load when ``model`` is not given; default the
            shipped one (:data:`kvpress_mm.apps.reference.CHECKPOINT_DIR`).
        seed: seed of the held-out sets.
        progress: show a tqdm progress bar on stderr.
        on_cell: called with each cell as soon as it is measured.

    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; the modes are {', '.join(MODES)}")
    if model is None:
        from kvpress_mm.apps.reference.model import load_reference_model

        model, _ = load_reference_model(checkpoint)
        source = describe_checkpoint(checkpoint)
    else:
        source = f"{type(model).__name__} (given)"
    configs: dict[str, dict[str, Any]] = {**DEFAULT_STRATEGY_CONFIGS}
    for name, extra in (strategy_configs or {}).items():
        configs[name] = {**configs.get(name, {}), **extra}
    arms: list[tuple[str, float]] = []
    for name in strategies:
        for r in [0.0] if name == "full" else ratios:
            arms.append((name, float(r)))
    compressors = {
        arm: compressor_from_spec(arm[0], arm[1], configs.get(arm[0], {}), DEFAULT_STRATEGY_CONFIGS) for arm in arms
    }
    sets = {n: heldout_prompts(n, contexts, seed=seed) for n in n_images}
    ids = word_ids()
    total = len(arms) * sum(len(s) for s in sets.values())
    bar = _progress(total, progress)
    result = AccuracyResult(
        settings={
            "model": source,
            "strategies": [c.to_config() for c in compressors.values()],
            "ratios": list(ratios),
            "n_images": list(n_images),
            "contexts": contexts,
            "prompts_per_cell": contexts,
            "mode": mode,
            "batch_size": batch_size,
            "seed": seed,
            "kinds": list(TASK_KINDS),
        }
    )
    start = time.monotonic()
    try:
        for arm in arms:
            for n, prompts in sets.items():
                for kind in TASK_KINDS:
                    group = [p for p in prompts if p.kind == kind]
                    correct, kept_sum = 0, 0.0
                    for s in range(0, len(group), batch_size):
                        chunk = group[s : s + batch_size]
                        predicted, kept = answer_batch(model, compressors[arm], chunk, mode)
                        correct += sum(t == ids[p.answer] for t, p in zip(predicted, chunk))
                        kept_sum += kept * len(chunk)
                        bar.update(len(chunk))
                    cell = AccuracyCell(arm[0], arm[1], n, kind, correct, len(group), kept_sum / max(1, len(group)))
                    result.cells.append(cell)
                    if on_cell is not None:
                        on_cell(cell)
    finally:
        bar.close()
    result.seconds = time.monotonic() - start
    return result


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr (a no-op object when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="accuracy", unit="prompt", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def format_table(result: AccuracyResult, n_images: int | None = None) -> str:
    """A Markdown table: one row per (strategy, ratio), one column per task kind, plus the mean.

    Accuracies are pooled over the image counts unless ``n_images`` picks one.
    """
    kinds = [k for k in TASK_KINDS if any(c.kind == k for c in result.cells)]
    head = "| strategy | ratio | " + " | ".join(kinds) + " | mean |"
    lines = [head, "|" + "---|" * (len(kinds) + 3)]
    for strategy, ratio in result.arms():
        accs = [result.accuracy(strategy, ratio, k, n_images) for k in kinds]
        mean = sum(accs) / len(accs)
        lines.append(f"| {strategy} | {ratio:g} | " + " | ".join(f"{a:.2f}" for a in accs) + f" | {mean:.2f} |")
    return "\n".join(lines)


def plot(result: AccuracyResult, path: str | Path) -> Path:
    """Save a PNG: one panel per task kind, accuracy against compression ratio, one line per strategy.

    ``full`` is drawn as a horizontal reference line. Needs matplotlib (Agg backend).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in TASK_KINDS if any(c.kind == k for c in result.cells)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), sharey=True, squeeze=False)
    strategies = list(dict.fromkeys(s for s, _ in result.arms()))
    counts = sorted({c.n_images for c in result.cells})
    for ax, kind in zip(axes[0], kinds):
        for strategy in strategies:
            ratios = sorted({r for s, r in result.arms() if s == strategy})
            accs = [result.accuracy(strategy, r, kind) for r in ratios]
            if strategy == "full":
                ax.axhline(accs[0], color="black", linestyle="--", linewidth=1, label="full")
            else:
                ax.plot(ratios, accs, marker="o", label=strategy)
        ax.set_title(kind)
        ax.set_xlabel("compression ratio")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: never over a line
    fig.suptitle(
        f"reference VLM, {'+'.join(map(str, counts))} images per prompt, mode {result.settings.get('mode', '?')}",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


# -- command line ---------------------------------------------------------------------------


def render_markdown(result: AccuracyResult) -> str:
    """The pooled table, then one table per image count, with a line on what was run."""
    counts = sorted({c.n_images for c in result.cells})
    parts = [
        f"Accuracy on held-out prompts ({result.settings.get('contexts')} per task kind and image count, "
        f"mode {result.settings.get('mode')}), images {'+'.join(map(str, counts))} pooled:",
        "",
        format_table(result),
    ]
    if len(counts) > 1:
        for n in counts:
            parts += ["", f"{n} images:", "", format_table(result, n)]
    return "\n".join(parts)
