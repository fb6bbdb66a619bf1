"""Train the reference VLM from scratch on the synthetic tasks, on one CPU thread, within a time budget.

```bash
OMP_NUM_THREADS=1 python -m kvpress_mm.apps.reference.train --minutes 52 --out kvpress_mm/apps/reference/checkpoint
```

The recipe (see ``docs/reference-model.md``): 32 questions per shared context (8 per task
kind), loss on the answer tokens only, a curriculum on the number of images (start at 2, add
one when the running training accuracy on the newest size reaches a threshold, up to 12, then
mix every size), AdamW
(0.9, 0.98) at a constant learning rate after a linear warm-up, batch 16, gradient clipping 1,
and CLIP's position embedding initialised with a large standard deviation so each image token
knows which cell it comes from. Progress goes to stderr; held-out accuracy is printed
periodically on a validation seed (never the held-out test seed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvpress_mm.apps.reference.evaluate import accuracy_by_kind
from kvpress_mm.apps.reference.model import (
    CHECKPOINT_DIR,
    PAD_ID,
    build_config,
    build_image_processor,
    build_processor,
)
from kvpress_mm.apps.reference.render import encode_words, pixel_values, word_ids
from kvpress_mm.apps.reference.tasks import (
    HELDOUT_SEED,
    MAX_IMAGES,
    TASK_KINDS,
    TRAIN_SEED,
    TaskConfig,
    TaskGenerator,
    TrainingExample,
    heldout_prompts,
)

#: Seed of the validation sets printed during training (neither the training nor the held-out seed).
VALIDATION_SEED = 777


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved next to the weights as ``training.json``)."""

    seed: int = TRAIN_SEED
    minutes: float = 55.0
    max_steps: int = 1_000_000
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    per_kind: int = 8
    start_images: int = 2
    max_images: int = 12
    curriculum_threshold: float = 0.8
    curriculum_window: int = 400
    newest_fraction: float = 0.5
    position_init_std: float = 10.0
    min_facts: int = 1
    max_facts: int = 4
    needle_weight: float = 4.0
    count_weight: float = 1.0
    final_mix: bool = True
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 256
    vision_hidden_size: int = 64
    vision_layers: int = 2
    eval_every_minutes: float = 3.0
    eval_contexts: int = 32
    final_contexts: int = 128
    threads: int = 1


def build_model(cfg: TrainConfig) -> Any:
    """A freshly initialised reference model (seeded), with the large CLIP position-embedding init."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(cfg.seed)
    config = build_config(
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        vision_hidden_size=cfg.vision_hidden_size,
        vision_layers=cfg.vision_layers,
    )
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.normal_(0.0, cfg.position_init_std)
    model.generation_config.pad_token_id = PAD_ID
    return model


def training_batch(examples: Sequence[TrainingExample]) -> dict[str, torch.Tensor]:
    """Right-padded inputs with ``labels``: the answer token ids at answer positions, -100 elsewhere."""
    ids = word_ids()
    rows: list[list[int]] = []
    targets: list[list[int]] = []
    for ex in examples:
        row = encode_words(ex.context.words)
        target = [-100] * len(row)
        for q in ex.questions:
            for w in q.words:
                row.append(ids[w])
                target.append(-100)
            row.append(ids[q.answer])
            target.append(ids[q.answer])
        rows.append(row)
        targets.append(target)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
        labels[i, : len(t)] = torch.tensor(t)
    grids = [g for ex in examples for g in ex.context.images]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values(grids),
        "labels": labels,
    }


def answer_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict an answer: ``(logits [n, vocab], targets [n], rows [n])``."""
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
    ).last_hidden_state  # [B, L, H]
    targets = batch["labels"][:, 1:]
    rows, cols = (targets != -100).nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, cols])  # the hidden state before each answer predicts it
    return logits, targets[rows, cols], rows


def task_config(cfg: TrainConfig) -> TaskConfig:
    """The task generator's config of a training run."""
    return TaskConfig(min_facts=cfg.min_facts, max_facts=cfg.max_facts)


def evaluate(
    model: Any, sizes: Sequence[int], contexts: int, seed: int, tasks: TaskConfig | None = None
) -> dict[int, dict[str, float]]:
    """Full-cache accuracy per kind on ``contexts`` contexts of each size (one question per prompt)."""
    model.eval()
    result = {n: accuracy_by_kind(model, heldout_prompts(n, contexts, seed=seed, config=tasks)) for n in sizes}
    model.train()
    return result


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k[:4]} {acc.get(k, float('nan')):.2f}" for k in TASK_KINDS)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(cfg: TrainConfig, out: Path | None) -> dict[str, Any]:
    """Train, print progress, save the checkpoint to ``out`` (if given); return the run summary."""
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    model = build_model(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"model: {n_params:,} parameters; config {json.dumps(asdict(cfg))}")
    decayed = {n for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n}
    decay = [p for n, p in model.named_parameters() if n in decayed]
    no_decay = [p for n, p in model.named_parameters() if n not in decayed]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    gen = TaskGenerator(seed=cfg.seed, config=task_config(cfg))
    rng = random.Random(cfg.seed + 1)
    current = cfg.start_images
    recent: deque[bool] = deque(maxlen=cfg.curriculum_window)  # answers on the newest size
    recent_by_kind: dict[str, deque[bool]] = {k: deque(maxlen=400) for k in TASK_KINDS}
    history: list[dict[str, Any]] = []
    start = time.monotonic()
    last_log = last_eval = start
    step = 0
    losses: deque[float] = deque(maxlen=50)
    while step < cfg.max_steps and time.monotonic() - start < cfg.minutes * 60:
        # one size per batch (little padding): the newest size, or any smaller one
        mixing = cfg.final_mix and current >= cfg.max_images
        if mixing:  # curriculum done: every size alike, and contexts with few questions too
            n_images = rng.randint(1, current)
            per_kind = [rng.randint(1, cfg.per_kind) for _ in range(cfg.batch_size)]
        else:
            n_images = current if rng.random() < cfg.newest_fraction else rng.randint(1, current)
            per_kind = [cfg.per_kind] * cfg.batch_size
        sizes = [n_images] * cfg.batch_size
        examples = [gen.training_example(n, q) for n, q in zip(sizes, per_kind)]
        batch = training_batch(examples)
        logits, targets, rows = answer_logits(model, batch)
        kinds = [q.kind for ex in examples for q in ex.questions]  # the order of the answer positions
        kind_weight = {"needle": cfg.needle_weight, "count": cfg.count_weight}
        weights = torch.tensor([kind_weight.get(k, 1.0) for k in kinds])
        per_answer = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        loss = (per_answer * weights).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(loss.item())
        right = (logits.argmax(-1) == targets).tolist()
        for r, ok, kind in zip(rows.tolist(), right, kinds):
            recent_by_kind[kind].append(ok)
            if sizes[r] == current:
                recent.append(ok)
        if (
            current < cfg.max_images
            and len(recent) == recent.maxlen
            and sum(recent) / len(recent) >= cfg.curriculum_threshold
        ):
            current += 1
            recent.clear()
            _log(f"[{(time.monotonic() - start) / 60:5.1f} min] step {step}: curriculum -> {current} images")
        now = time.monotonic()
        if now - last_log >= 30:
            last_log = now
            run_acc = {k: sum(v) / max(1, len(v)) for k, v in recent_by_kind.items()}
            _log(
                f"[{(now - start) / 60:5.1f} min] step {step} ({step / (now - start):.2f}/s) images<={current} "
                f"loss {sum(losses) / len(losses):.3f} train {_fmt(run_acc)}"
            )
        if now - last_eval >= cfg.eval_every_minutes * 60:
            last_eval = now
            sizes_eval = sorted({4, 8, current})
            acc = evaluate(model, sizes_eval, cfg.eval_contexts, VALIDATION_SEED, task_config(cfg))
            history.append({"minutes": (now - start) / 60, "step": step, "images": current, "validation": acc})
            for n in sizes_eval:
                _log(f"[{(now - start) / 60:5.1f} min]   validation {n:2d} images: {_fmt(acc[n])}")
    wall = time.monotonic() - start
    _log(f"stopped after {step} steps, {wall / 60:.1f} min; final held-out evaluation ...")
    final_sizes = [n for n in (1, 2, 4, 8, 12, 16) if n <= MAX_IMAGES]
    final = evaluate(model, final_sizes, cfg.final_contexts, HELDOUT_SEED, task_config(cfg))
    for n in final_sizes:
        _log(f"held-out {n:2d} images: {_fmt(final[n])}")
    model.eval()
    summary = {
        "config": asdict(cfg),
        "parameters": n_params,
        "steps": step,
        "train_minutes": wall / 60,
        "curriculum_images": current,
        "heldout_accuracy": {str(n): final[n] for n in final_sizes},
        "heldout_contexts_per_size": cfg.final_contexts,
        "history": history,
    }
    if out is not None:
        save(model, out, summary)
        _log(f"saved to {out}")
    return summary


def save(model: Any, out: Path, summary: dict[str, Any]) -> None:
    """Write the checkpoint: config, weights (safetensors), processor, image processor, training summary."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor().save_pretrained(out)
    build_image_processor().save_pretrained(out)
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m kvpress_mm.apps.reference.train [--minutes M] [--out DIR] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m kvpress_mm.apps.reference.train",
        description="Train the reference VLM on the synthetic tasks (one CPU thread, time-budgeted).",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"checkpoint directory (the shipped one: {CHECKPOINT_DIR})"
    )
    for f in TrainConfig.__dataclass_fields__.values():
        default = f.default
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f"default {default}")
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"default {default}")
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})
    summary = train(cfg, args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return 0 if math.isfinite(summary["train_minutes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
