"""``kvpress-mm run``: generate with a compressed KV cache on a local model, with real images.

The strategy is built (and its options validated) first, then the images are read, then the
model directory's config and processor (a text-only model given images, or image markers that
do not match the images, fail here), and only then are the weights loaded: a mistake fails in
a second, with one line, rather than after loading weights. Options
given as ``key=value`` go to the strategy's config; values are read as JSON when they parse
(``16``, ``0.5``, ``true``, ``null``) and as strings otherwise (``pooling=max``).

```python
from kvpress_mm.apps.run import run

result = run("path/to/llava", "What differs between the pictures?", ["a.png", "b.png"],
             "lookm-pivotal", compression_ratio=0.8, settings={"window_size": 16})
print(result.answer, result.kv_bytes_before, result.kv_bytes_after)
```
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvpress_mm.apps.generation import generate
from kvpress_mm.apps.models import encode, image_token_count, load_image, load_model, open_model_dir
from kvpress_mm.apps.prompts import Prompt
from kvpress_mm.apps.tables import human_bytes, wrap
from kvpress_mm.compressor import Compressor
from kvpress_mm.errors import UsageError


def parse_setting(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``, the value read as JSON when it parses, else a string.

    Raises:
        ValueError: no ``=`` or an empty key.

    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"expected key=value, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def build_compressor(
    name: str, compression_ratio: float | None = None, settings: dict[str, Any] | None = None
) -> Compressor:
    """``Compressor.from_name(name, ...)`` with the ratio and the ``key=value`` settings.

    Raises:
        UnknownStrategyError: ``name`` is not registered.
        pydantic.ValidationError: a setting is unknown or invalid for the strategy.
        UsageError: the ratio is given twice (``compression_ratio`` and a setting).

    """
    config = dict(settings or {})
    if compression_ratio is not None:
        if "compression_ratio" in config:
            raise UsageError("the compression ratio is given twice (--ratio and --set compression_ratio=...)")
        config["compression_ratio"] = compression_ratio
    return Compressor.from_name(name, **config)


#: Separates the names of a strategy spec: ``"mixkv:pyramid:snapkv"`` is mixkv(pyramid(snapkv)).
SPEC_SEPARATOR = ":"


def spec_names(spec: str) -> list[str]:
    """The strategy names of a spec, outermost first: ``"pyramid:snapkv"`` -> ``["pyramid", "snapkv"]``.

    Raises:
        UsageError: an empty name (``"pyramid:"``).

    """
    names = [name.strip() for name in spec.split(SPEC_SEPARATOR)]
    if not all(names):
        raise UsageError(f"strategy spec {spec!r} has an empty name; write e.g. pyramid:snapkv or mixkv:pyramid:h2o")
    return names


def compressor_from_spec(
    spec: str,
    compression_ratio: float,
    config: dict[str, Any] | None = None,
    defaults: dict[str, dict[str, Any]] | None = None,
) -> Compressor:
    """A strategy from a spec: a registered name, or wrappers around it separated by ``:``.

    ``"pyramid:snapkv"`` is ``pyramid`` with ``inner="snapkv"``; ``"mixkv:pyramid:h2o"`` is
    ``mixkv(pyramid(h2o))``. ``config`` (a ``--set`` for the whole spec) goes to the outermost
    strategy; ``defaults`` (per registered name, e.g. a benchmark's ``snapkv.window_size``) go to
    each level whose name has some. The ratio is the outermost strategy's, which passes it down.

    Raises:
        UsageError: an empty name in the spec.
        UnknownStrategyError: a name is not registered.
        pydantic.ValidationError: a config value is invalid, or the combination is refused.

    """
    names = spec_names(spec)
    defaults = defaults or {}
    inner: dict[str, Any] | None = None
    for depth, name in enumerate(reversed(names)):
        level: dict[str, Any] = {"strategy": name, **defaults.get(name, {})}
        if inner is not None:
            level["inner"] = inner
        if depth == len(names) - 1:  # the outermost
            level.update(config or {})
            if "text_ratio" not in level or "vision_ratio" not in level:
                level["compression_ratio"] = compression_ratio
        inner = level
    assert inner is not None
    return Compressor.from_config(inner)


@dataclass
class RunResult:
    """One ``kvpress-mm run``: the answer and what the cache cost."""

    model: str
    strategy: dict[str, Any]
    answer: str
    prompt_tokens: int
    image_tokens: int
    images: int
    kv_bytes_before: int
    kv_bytes_after: int
    kv_bytes_end: int
    n_keep: list[int]
    new_tokens: int
    decode_ms_per_token: float
    prefill_ms: float
    tokens: list[int] = field(repr=False)

    @property
    def saved_fraction(self) -> float:
        """Fraction of the prompt's KV bytes released by compression."""
        return 1 - self.kv_bytes_after / self.kv_bytes_before if self.kv_bytes_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (with ``saved_fraction``)."""
        return {**asdict(self), "saved_fraction": self.saved_fraction}


def run(
    model_dir: str,
    prompt: str,
    image_paths: Sequence[str] = (),
    strategy: str = "full",
    compression_ratio: float | None = None,
    settings: dict[str, Any] | None = None,
    max_new_tokens: int = 64,
    chat_template: bool = True,
    device: str = "cpu",
    dtype: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Generate an answer to ``prompt`` (with images) on the model in ``model_dir`` under a strategy.

    Images go where the processor's image token (``<image>`` for LLaVA) appears in
    ``prompt``, or first when it does not appear. Generation is greedy and stops at the
    model's end-of-sequence token or after ``max_new_tokens``.

    Raises:
        UnknownStrategyError, pydantic.ValidationError: a bad strategy or setting.
        UsageError: a missing model directory, an unreadable image, images for a text-only model.

    """
    compressor = build_compressor(strategy, compression_ratio, settings)
    images = [load_image(path) for path in image_paths]
    files = open_model_dir(model_dir)
    if images and not files.multimodal:
        raise UsageError(
            f"the model in '{model_dir}' is text-only ({files.model_type}) but {len(images)} image(s) were given"
        )
    try:
        parts = Prompt.from_text(prompt, images, files.image_token)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if progress is not None:
        progress(f"loading {model_dir} ...")
    loaded = load_model(files, device=device, dtype=dtype)
    inputs = encode(loaded, parts, chat_template)
    result = generate(loaded.model, inputs, max_new_tokens, compressor, stop_at_eos=True)
    report = result.report
    return RunResult(
        model=loaded.description,
        strategy=compressor.to_config(),
        answer=str(loaded.tokenizer.decode(result.tokens, skip_special_tokens=True)).strip(),
        prompt_tokens=result.prompt_length,
        image_tokens=image_token_count(loaded, inputs),
        images=len(images),
        kv_bytes_before=result.kv_bytes_before,
        kv_bytes_after=result.kv_bytes_after,
        kv_bytes_end=result.kv_bytes_end,
        n_keep=list(report.n_keep) if report is not None and report.n_keep else [result.prompt_length],
        new_tokens=len(result.tokens),
        decode_ms_per_token=result.decode_ms_per_token,
        prefill_ms=result.prefill_ms,
        tokens=result.tokens,
    )


def render(result: RunResult) -> str:
    """The answer, then a paragraph on the memory saved."""
    config = ", ".join(f"{k}={v!r}" for k, v in result.strategy.items() if k != "strategy")
    kept = result.n_keep[0] if result.n_keep else result.prompt_tokens
    images = f" ({result.image_tokens:,} of them image tokens, {result.images} image(s))" if result.images else ""
    memory = (
        f"KV cache of the prompt: {human_bytes(result.kv_bytes_before)} -> {human_bytes(result.kv_bytes_after)} "
        f"({result.saved_fraction:.0%} saved) under {result.strategy['strategy']} ({config}); "
        f"prompt {result.prompt_tokens:,} tokens{images}, {kept:,} kept per layer and KV head; "
        f"{result.new_tokens} tokens generated at {result.decode_ms_per_token:.1f} ms/token."
    )
    return f"{result.answer}\n\n{wrap(memory)}"
