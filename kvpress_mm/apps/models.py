"""Loading models for the commands (a local directory or the shipped reference VLM) and encoding prompts.

Nothing is downloaded: a model directory is read with ``local_files_only=True`` (write one
with ``model.save_pretrained(d)`` and ``processor.save_pretrained(d)``). Vision-language
models load with ``AutoModelForImageTextToText`` and ``AutoProcessor`` (the PIL image-processor
backend: torchvision is not required); text-only models with ``AutoModelForCausalLM`` and
``AutoTokenizer``. Prompts are turned into inputs by the model's own processor, so images
become the placeholder tokens and ``pixel_values`` the model expects.

```python
from kvpress_mm.apps.models import default_model, encode, load_model
from kvpress_mm.apps.prompts import Prompt

loaded = load_model("path/to/llava")           # or default_model(): the shipped reference VLM
inputs = encode(loaded, Prompt.from_text("What is shown?", [image]))
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvpress_mm.apps.prompts import Prompt
from kvpress_mm.errors import UsageError

#: Families whose transformers ``Processor`` cannot be built without torchvision (it needs a
#: video processor): :mod:`kvpress_mm.apps.processors` stands in for it (images only).
TORCHVISION_PROCESSOR_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for the commands, with what turns prompts into its inputs.

    Attributes:
        model: the transformers model, in eval mode.
        tokenizer: its tokenizer (the processor's, for a vision-language model).
        processor: its multimodal processor; ``None`` for a text-only model.
        description: one line saying what the model is.
        source: the directory it was loaded from, or ``"embedded"`` for a model built in code.
        random_weights: True for a random-weight model built in code (tests' tiny models).

    """

    model: torch.nn.Module
    tokenizer: Any
    processor: Any | None
    description: str
    source: str
    random_weights: bool = False

    @property
    def multimodal(self) -> bool:
        """True when the model takes images."""
        return self.processor is not None

    @property
    def image_token(self) -> str | None:
        """The text the processor expands into an image's placeholder tokens (``<image>``)."""
        if self.processor is None:
            return None
        token = getattr(self.processor, "image_token", None)
        return str(token) if token else None

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The text model's ``max_position_embeddings``, when the config has one."""
        return context_length(self.model.config)


def context_length(config: Any) -> int | None:
    """The text model's ``max_position_embeddings`` in ``config``, when it has one."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else None


def default_model(checkpoint: str | os.PathLike[str] | None = None) -> LoadedModel:
    """The model the commands use without ``--model``: the reference VLM shipped in the package.

    A tiny LLaVA trained on synthetic multi-image tasks (:mod:`kvpress_mm.apps.reference`), loaded
    from ``checkpoint`` (default the shipped :data:`kvpress_mm.apps.reference.CHECKPOINT_DIR`) with
    :func:`load_model`; nothing is downloaded.

    Raises:
        kvpress_mm.errors.MissingCheckpointError: the directory has no ``model.safetensors``; the
            message says how to train a checkpoint.
        UsageError: the directory is not a loadable model.

    """
    from kvpress_mm.apps.reference.model import require_checkpoint

    directory = require_checkpoint(checkpoint)
    loaded = load_model(directory)
    loaded.description = f"the reference VLM from {directory}: {reference_description(loaded.model)}"
    return loaded


def reference_description(model: Any) -> str:
    """One line on a reference model's shape (CLIP tower, tokens per image, text decoder, parameters)."""
    config = model.config
    vision, text = config.vision_config, config.get_text_config()
    per_image = (vision.image_size // vision.patch_size) ** 2
    return (
        f"{type(model).__name__} trained on synthetic multi-image tasks (CLIP {vision.image_size} px / patch "
        f"{vision.patch_size}, {per_image} tokens per image; Llama {text.num_hidden_layers} layers, hidden "
        f"{text.hidden_size}, {text.num_key_value_heads} KV heads; {_parameters(model)} parameters)"
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_model_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a ``Path`` if it looks like a model directory (has ``config.json``).

    Raises:
        UsageError: it does not exist, is not a directory, or has no ``config.json``.

    """
    directory = Path(path)
    if not directory.exists():
        raise UsageError(f"model directory '{path}' does not exist")
    if not directory.is_dir():
        raise UsageError(f"'{path}' is not a directory; --model takes a directory written by save_pretrained")
    if not (directory / "config.json").is_file():
        raise UsageError(
            f"'{path}' holds no config.json: not a model directory (write one with model.save_pretrained(dir))"
        )
    return directory


def is_vision_language(config: Any) -> bool:
    """True for a config with a vision tower (``vision_config``)."""
    return getattr(config, "vision_config", None) is not None


def _load_processor(directory: Path, config: Any) -> Any:
    from transformers import AutoProcessor

    model_type = str(getattr(config, "model_type", "?"))
    try:
        try:
            return AutoProcessor.from_pretrained(directory, local_files_only=True, backend="pil")
        except TypeError:  # transformers releases before the `backend` argument
            return AutoProcessor.from_pretrained(directory, local_files_only=True, use_fast=False)
    except Exception as error:
        if model_type not in TORCHVISION_PROCESSOR_FAMILIES:
            raise UsageError(f"cannot load the processor of '{directory}': {_one_line(error)}") from None
    # Qwen-VL / InternVL: their Processor classes need torchvision (a video processor)
    from kvpress_mm.apps.processors import image_only_processor

    try:
        return image_only_processor(directory, config)
    except Exception as error:
        raise UsageError(
            f"cannot load the tokenizer and image processor of '{directory}' ({model_type}): {_one_line(error)}"
        ) from None


@dataclass
class ModelFiles:
    """What a model directory holds, read without the weights: config and processor or tokenizer.

    Reading these first lets a command check its inputs (images for a text-only model, image
    markers) in a second, before loading weights that can take minutes.
    """

    directory: Path
    config: Any
    tokenizer: Any
    processor: Any | None

    @property
    def model_type(self) -> str:
        """The config's ``model_type``."""
        return str(getattr(self.config, "model_type", "?"))

    @property
    def multimodal(self) -> bool:
        """True when the model takes images."""
        return self.processor is not None

    @property
    def image_token(self) -> str | None:
        """The text the processor expands into an image's placeholder tokens (``<image>``)."""
        token = getattr(self.processor, "image_token", None) if self.processor is not None else None
        return str(token) if token else None

    @property
    def context_length(self) -> int | None:
        """The text model's ``max_position_embeddings``, when the config has one."""
        return context_length(self.config)


def open_model_dir(path: str | os.PathLike[str]) -> ModelFiles:
    """Read a local model directory's config and processor (or tokenizer), not its weights.

    Raises:
        UsageError: the directory is missing or is not a model directory, or its config,
            processor or tokenizer cannot be read; the message is one line.

    """
    from transformers import AutoConfig, AutoTokenizer

    directory = check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        raise UsageError(f"cannot read the model config in '{path}': {_one_line(error)}") from None
    if is_vision_language(config):
        processor = _load_processor(directory, config)
        return ModelFiles(directory, config, processor.tokenizer, processor)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        raise UsageError(f"cannot load the tokenizer of '{path}': {_one_line(error)}") from None
    return ModelFiles(directory, config, tokenizer, None)


def load_model(
    path: str | os.PathLike[str] | ModelFiles,
    device: str = "cpu",
    dtype: str | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a model and its processor or tokenizer from a local directory (no network).

    Args:
        path: a directory written by ``save_pretrained`` (config, weights, processor/tokenizer),
            or what :func:`open_model_dir` read from one.
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (the checkpoint's);
            default float32 on CPU, the checkpoint's elsewhere.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.

    Raises:
        UsageError: the directory is missing or not a loadable model, or its processor cannot
            be built; the message is one line.

    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    files = path if isinstance(path, ModelFiles) else open_model_dir(path)
    if dtype is None:
        dtype = "float32" if device == "cpu" else "auto"
    if dtype != "auto" and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    options: dict[str, Any] = {"local_files_only": True, "dtype": "auto" if dtype == "auto" else DTYPES[dtype]}
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    model_class: Any = AutoModelForImageTextToText if files.multimodal else AutoModelForCausalLM
    try:
        model: Any = model_class.from_pretrained(files.directory, **options)
    except Exception as error:
        raise UsageError(
            f"cannot load the {files.model_type} model in '{files.directory}' with {model_class.__name__}: "
            f"{_one_line(error)}"
        ) from None
    model = model.to(device).eval()
    tokenizer = files.tokenizer
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generation_config.pad_token_id = pad
    description = f"{type(model).__name__} from {files.directory} ({files.model_type}, {_parameters(model)} parameters)"
    return LoadedModel(model, tokenizer, files.processor, description, str(files.directory))


def _parameters(model: torch.nn.Module) -> str:
    count = sum(p.numel() for p in model.parameters())
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def load_image(path: str | os.PathLike[str]) -> Any:
    """Open an image file as RGB.

    Raises:
        UsageError: the file is missing or is not an image PIL can read.

    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"image '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UsageError(f"cannot read image '{path}': {_one_line(error)}") from None


def _chat_text(loaded: LoadedModel, prompt: Prompt) -> str | None:
    """The prompt rendered by the model's chat template, or ``None`` when it has none."""
    owner = loaded.processor if loaded.processor is not None else loaded.tokenizer
    if not getattr(owner, "chat_template", None):
        return None
    if loaded.processor is None:
        content: Any = prompt.text_with("")
    else:
        content = [
            {"type": "text", "text": part} if isinstance(part, str) else {"type": "image"} for part in prompt.parts
        ]
    messages = [{"role": "user", "content": content}]
    text = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return str(text)


def encode(loaded: LoadedModel, prompt: Prompt, chat_template: bool = True) -> dict[str, torch.Tensor]:
    """The model inputs of ``prompt`` (a batch of one), on the model's device.

    The model's chat template is applied when it has one and ``chat_template`` is true;
    otherwise the prompt's text is used as is, each image replaced by the processor's image
    token. The processor expands image tokens into the model's placeholders.

    Raises:
        UsageError: images given to a text-only model, or a processor without an image token.

    """
    images = prompt.images
    if images and not loaded.multimodal:
        raise UsageError(
            f"this model is text-only ({type(loaded.model).__name__}) but {len(images)} image(s) were given"
        )
    text = _chat_text(loaded, prompt) if chat_template else None
    if loaded.processor is None:
        text = text if text is not None else prompt.text_with("")
        batch = loaded.tokenizer(text, return_tensors="pt")
    else:
        image_token = loaded.image_token
        if images and image_token is None:
            raise UsageError(f"the processor {type(loaded.processor).__name__} has no image token")
        text = text if text is not None else prompt.text_with(image_token or "")
        batch = loaded.processor(text=[text], images=images or None, return_tensors="pt")
    inputs = {k: v for k, v in dict(batch).items() if isinstance(v, torch.Tensor) and k != "token_type_ids"}
    device = loaded.device
    return {k: v.to(device) for k, v in inputs.items()}


def image_token_count(loaded: LoadedModel, inputs: Mapping[str, torch.Tensor]) -> int:
    """How many of the prompt's tokens are image placeholders."""
    config: Any = loaded.model.config
    token_id = getattr(config, "image_token_id", None)
    if token_id is None or "input_ids" not in inputs:
        return 0
    return int((inputs["input_ids"] == int(token_id)).sum())
