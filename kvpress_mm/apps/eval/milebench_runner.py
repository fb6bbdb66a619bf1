"""Running MileBench with a compressed KV cache: sharded, resumable generation, then merge and score.

Generation. Each process takes the samples whose index in its dataset is ``rank`` modulo
``world_size`` (from the ``RANK`` / ``WORLD_SIZE`` environment variables that
``accelerate launch`` and ``torchrun`` set; one process without them). For every finished
sample it appends one JSON line to ``{output}/predictions/{dataset}.rank{rank}.jsonl`` and
flushes it to disk, so a run can be killed at any moment and loses at most the sample in
progress. A restarted run reads every rank's files and skips every finished sample, whatever
the number of processes was before; a half-written last line is ignored.

Merge (:mod:`kvpress_mm.apps.eval.milebench_results`). Process 0 waits until every selected
sample has a prediction, then scores them and writes the results.

The run's settings (model, strategy config, generation limits) are recorded in
``{output}/run_config.json``; a restart with different settings is refused rather than mixed
into the same results.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpress_mm.apps.eval.milebench import (
    IMAGE_PLACEHOLDER,
    Dataset,
    Sample,
    build_prompt,
    discover_datasets,
    load_dataset,
)
from kvpress_mm.apps.generation import generate
from kvpress_mm.apps.models import LoadedModel, ModelFiles, encode, image_token_count, load_image
from kvpress_mm.apps.prompts import Prompt
from kvpress_mm.compressor import Compressor
from kvpress_mm.errors import UsageError

RUN_CONFIG = "run_config.json"
PREDICTIONS = "predictions"
#: Run settings that must match for a restart to continue the same results.
RESUME_KEYS = ("model", "strategy", "max_new_tokens", "max_context_len", "tokens_per_image", "chat_template")


def process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from ``RANK`` / ``WORLD_SIZE`` (set by ``accelerate launch``, ``torchrun``)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UsageError("RANK and WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"inconsistent RANK={rank} / WORLD_SIZE={world}")
    return rank, world


# -- the predictions store -----------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The complete JSON objects of a JSONL file (a torn last line is skipped)."""
    with path.open(encoding="utf-8") as file:
        for line in file:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that sample is simply redone
            if isinstance(record, dict):
                yield record


class PredictionStore:
    """The JSONL prediction files of one dataset: one per rank, append-only."""

    def __init__(self, output_dir: Path, dataset: str, rank: int) -> None:
        self.directory = output_dir / PREDICTIONS
        self.dataset = dataset
        self.path = self.directory / f"{dataset}.rank{rank}.jsonl"

    def files(self) -> list[Path]:
        """Every rank's file for this dataset."""
        return sorted(self.directory.glob(f"{self.dataset}.rank*.jsonl"))

    def load(self) -> dict[str, dict[str, Any]]:
        """Every finished prediction, by sample key (the first record of a sample wins)."""
        records: dict[str, dict[str, Any]] = {}
        for path in self.files():
            for record in _read_jsonl(path):
                records.setdefault(str(record.get("sample_id")), record)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and force it to disk."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as file:
            file.seek(0, os.SEEK_END)
            if file.tell() > 0:
                file.seek(-1, os.SEEK_END)
                if file.read(1) != b"\n":  # a torn line from a crash: start on a fresh line
                    file.write(b"\n")
            file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())


# -- settings ------------------------------------------------------------------------------


@dataclass
class EvalSettings:
    """What a MileBench evaluation runs (see ``kvpress-mm eval milebench --help``)."""

    data_dir: str
    output_dir: str
    compressor: Compressor
    datasets: list[str] | None = None
    max_new_tokens: int = 512
    max_context_len: int | None = None
    tokens_per_image: int | None = None
    chat_template: bool = True
    limit: int | None = None

    def selected(self) -> list[Dataset]:
        """The datasets to evaluate, loaded (``limit``: the first samples of each)."""
        names = self.datasets or discover_datasets(self.data_dir)
        loaded = [load_dataset(self.data_dir, name) for name in names]
        if self.limit is not None:
            for dataset in loaded:
                dataset.samples = dataset.samples[: self.limit]
        return loaded


def measure_tokens_per_image(files: ModelFiles) -> int:
    """Image placeholder tokens the model's processor writes for one square 336-pixel image."""
    from PIL import Image

    token_id = getattr(files.config, "image_token_id", None)
    if files.processor is None or files.image_token is None or token_id is None:
        return 0
    image = Image.new("RGB", (336, 336), (128, 128, 128))
    batch = files.processor(text=[files.image_token], images=[image], return_tensors="pt")
    return int((batch["input_ids"] == int(token_id)).sum())


@dataclass(frozen=True)
class RunLimits:
    """The prompt budget of a run: MileBench's ``max_context_len`` and ``n_tokens_per_image``."""

    max_context_len: int
    tokens_per_image: int


def resolve_limits(settings: EvalSettings, files: ModelFiles) -> RunLimits:
    """The settings' limits, else derived from the model.

    The default context budget is the model's ``max_position_embeddings`` minus the answer's
    ``max_new_tokens`` minus 64 tokens for the chat template.
    """
    tokens_per_image = settings.tokens_per_image
    if tokens_per_image is None:
        tokens_per_image = measure_tokens_per_image(files)
    max_context_len = settings.max_context_len
    if max_context_len is None:
        window = files.context_length
        if window is None:
            raise UsageError("the model config has no max_position_embeddings: pass --max-context-len")
        max_context_len = window - settings.max_new_tokens - 64
        if max_context_len <= 0:
            raise UsageError(
                f"the model's window ({window} tokens) leaves no room for a prompt with --max-new-tokens "
                f"{settings.max_new_tokens}: pass a smaller --max-new-tokens or --max-context-len"
            )
    return RunLimits(max_context_len, tokens_per_image)


def _run_config(settings: EvalSettings, files: ModelFiles, limits: RunLimits) -> dict[str, Any]:
    return {
        "model": str(files.directory.resolve()),
        "model_type": files.model_type,
        "strategy": settings.compressor.to_config(),
        "max_new_tokens": settings.max_new_tokens,
        "max_context_len": limits.max_context_len,
        "tokens_per_image": limits.tokens_per_image,
        "chat_template": settings.chat_template,
        "data_dir": str(Path(settings.data_dir).resolve()),
    }


def prepare_run(settings: EvalSettings, files: ModelFiles, rank: int) -> RunLimits:
    """Resolve the run's limits and record its settings (or refuse a restart with other ones).

    Only the config and the processor are needed, so a wrong restart fails before the
    weights are loaded.
    """
    limits = resolve_limits(settings, files)
    check_or_write_run_config(Path(settings.output_dir), _run_config(settings, files, limits), rank)
    return limits


def check_or_write_run_config(output_dir: Path, config: dict[str, Any], rank: int) -> None:
    """Record the run's settings, or refuse to continue a run made with other settings.

    Raises:
        UsageError: ``run_config.json`` exists with different settings.

    """
    path = output_dir / RUN_CONFIG
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = None
        if isinstance(previous, dict):
            changed = [key for key in RESUME_KEYS if previous.get(key) != config.get(key)]
            if changed:
                raise UsageError(
                    f"'{output_dir}' holds results of a run with other settings ({', '.join(changed)} differ); "
                    "use another --output directory, or delete this one to start over"
                )
            return
    output_dir.mkdir(parents=True, exist_ok=True)
    temporary = output_dir / f".{RUN_CONFIG}.rank{rank}.tmp"
    temporary.write_text(json.dumps(config, indent=2), encoding="utf-8")
    temporary.replace(path)  # atomic: every rank writes the same content


# -- generation ----------------------------------------------------------------------------


@dataclass
class ShardOutcome:
    """What one process did."""

    rank: int
    world_size: int
    generated: int
    skipped: int
    assigned: int
    seconds: float


def shard(samples: Sequence[Sample], rank: int, world_size: int) -> list[Sample]:
    """The samples process ``rank`` owns: every ``world_size``-th, starting at ``rank``."""
    return [sample for index, sample in enumerate(samples) if index % world_size == rank]


def predict(
    loaded: LoadedModel,
    dataset: Dataset,
    sample: Sample,
    compressor: Compressor,
    max_new_tokens: int,
    max_context_len: int,
    tokens_per_image: int,
    chat_template: bool,
) -> dict[str, Any]:
    """Build the sample's prompt as MileBench does, generate under ``compressor``, return the record."""
    tokenizer = loaded.tokenizer
    started = time.perf_counter()
    built = build_prompt(
        dataset,
        sample,
        lambda text: tokenizer(text, add_special_tokens=False).input_ids,
        lambda ids: str(tokenizer.decode(ids)),
        max_context_len,
        tokens_per_image,
    )
    images = [load_image(path) for path in built.image_paths]
    try:
        prompt = Prompt.from_text(built.text, images, IMAGE_PLACEHOLDER, name=f"{dataset.name}/{sample.key}")
    except ValueError as error:
        raise UsageError(f"MileBench dataset '{dataset.name}' sample {sample.sample_id}: {error}") from None
    inputs = encode(loaded, prompt, chat_template)
    result = generate(loaded.model, inputs, max_new_tokens, compressor, stop_at_eos=True)
    return {
        "sample_id": sample.sample_id,
        "gt_response": sample.response,
        "pred_response": str(tokenizer.decode(result.tokens, skip_special_tokens=True)).strip(),
        "prompt_tokens": result.prompt_length,
        "image_tokens": image_token_count(loaded, inputs),
        "images_used": len(built.image_paths),
        "images_total": len(sample.images),
        "truncated": built.truncated,
        "new_tokens": len(result.tokens),
        "kv_bytes_before": result.kv_bytes_before,
        "kv_bytes_after": result.kv_bytes_after,
        "seconds": round(time.perf_counter() - started, 3),
    }


def generate_shard(
    settings: EvalSettings,
    loaded: LoadedModel,
    datasets: Sequence[Dataset],
    limits: RunLimits,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int], Any] | None = None,
) -> ShardOutcome:
    """Generate this process's unfinished samples, appending each record as soon as it is done.

    ``limits`` come from :func:`prepare_run`. ``progress`` is called with the number of samples
    to do, and returns a callable that is called once per finished sample (a progress bar's
    ``update``).
    """
    started = time.perf_counter()
    output_dir = Path(settings.output_dir)
    todo: list[tuple[Dataset, Sample, PredictionStore]] = []
    assigned = 0
    for dataset in datasets:
        store = PredictionStore(output_dir, dataset.name, rank)
        done = set(store.load())
        mine = shard(dataset.samples, rank, world_size)
        assigned += len(mine)
        todo += [(dataset, sample, store) for sample in mine if sample.key not in done]
    tick = progress(len(todo)) if progress is not None else None
    for dataset, sample, store in todo:
        record = predict(
            loaded,
            dataset,
            sample,
            settings.compressor,
            settings.max_new_tokens,
            limits.max_context_len,
            limits.tokens_per_image,
            settings.chat_template,
        )
        store.append({"dataset": dataset.name, "rank": rank, **record})
        if tick is not None:
            tick(1)
    return ShardOutcome(rank, world_size, len(todo), assigned - len(todo), assigned, time.perf_counter() - started)


# -- merge and score -----------------------------------------------------------------------
