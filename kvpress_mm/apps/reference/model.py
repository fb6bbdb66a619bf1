"""The reference VLM's architecture, tokenizer and image processor, and loading the shipped checkpoint.

The model is a transformers ``LlavaForConditionalGeneration``: a 2-layer CLIP vision tower on
28 px images (patch 14, so 4 tokens per image: one per cell of the 2x2 grid) and a 3-layer
Llama text decoder (hidden 96, 4 heads, tied embeddings) over a word-level vocabulary of the
task words (:func:`kvpress_mm.apps.reference.tasks.vocabulary`). The checkpoint in
``kvpress_mm/apps/reference/checkpoint/`` is a plain ``save_pretrained`` directory:

```python
from transformers import AutoProcessor, LlavaForConditionalGeneration
from kvpress_mm.apps.reference import CHECKPOINT_DIR

model = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT_DIR)
processor = AutoProcessor.from_pretrained(CHECKPOINT_DIR)  # LlavaProcessor (PIL image processor)
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kvpress_mm.apps.reference.tasks import IMAGE_WORD, vocabulary

#: Directory of the shipped checkpoint (config, weights, tokenizer, processor).
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"

#: Image side in pixels, and the CLIP patch side: (28 / 14) ** 2 = 4 tokens per image.
IMAGE_SIZE = 28
PATCH_SIZE = 14
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2
#: CLIP's normalisation (``OPENAI_CLIP_MEAN`` / ``OPENAI_CLIP_STD``).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
#: Token id of the image placeholder (``config.image_token_id``).
IMAGE_TOKEN_ID = vocabulary().index(IMAGE_WORD)


def vocab_size() -> int:
    """The embedding table size: the vocabulary rounded up to a multiple of 8."""
    n = len(vocabulary())
    return (n + 7) // 8 * 8


def build_config(
    hidden_size: int = 96,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    intermediate_size: int = 256,
    vision_hidden_size: int = 64,
    vision_layers: int = 2,
    max_positions: int = 1024,
) -> Any:
    """The reference model's ``LlavaConfig`` (defaults: the shipped model's shape)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=True,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=TOKENS_PER_IMAGE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )


def build_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over the task vocabulary (adds ``<bos>`` in front).

    ``<image>`` is a special token (``tokenizer.image_token``) with id ``config.image_token_id``.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    core.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_WORD},
        model_max_length=1024,
    )


def build_image_processor() -> Any:
    """The PIL-backed ``CLIPImageProcessorPil`` for 28 px images with CLIP's normalisation."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


def build_processor() -> Any:
    """A ``LlavaProcessor``: the tokenizer plus the image processor; expands ``<image>`` to 4 tokens."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_WORD,
    )


#: How to train a checkpoint (about 50 minutes on one CPU thread), for error messages and docs.
TRAIN_COMMAND = "OMP_NUM_THREADS=1 python -m kvpress_mm.apps.reference.train --minutes 52 --out {directory}"


def require_checkpoint(path: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint directory (default :data:`CHECKPOINT_DIR`), if it holds ``model.safetensors``.

    Raises:
        kvpress_mm.errors.MissingCheckpointError: it does not (a ``FileNotFoundError``); the
            message is one line saying how to train one.

    """
    from kvpress_mm.errors import MissingCheckpointError

    directory = Path(path) if path is not None else CHECKPOINT_DIR
    if not (directory / "model.safetensors").is_file():
        raise MissingCheckpointError(
            f"no reference checkpoint in {directory} (no model.safetensors); train one (about 50 minutes on one "
            f"CPU thread) with `{TRAIN_COMMAND.format(directory=directory)}`"
        )
    return directory


def has_task_vocabulary(tokenizer: Any) -> bool:
    """True when ``tokenizer`` is the reference model's word-level tokenizer (its vocabulary, same ids).

    Tells a reference checkpoint from another model directory: only a reference model reads the
    task prompts of :mod:`kvpress_mm.apps.reference.tasks`.
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return False
    vocab = get_vocab()
    return len(vocab) == len(vocabulary()) and all(vocab.get(w) == i for i, w in enumerate(vocabulary()))


def load_reference_model(path: str | Path | None = None, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """Load the shipped reference VLM: ``(model, processor)``, the model in eval mode, float32.

    Args:
        path: a checkpoint directory; default the one shipped in the package (:data:`CHECKPOINT_DIR`).
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.

    Raises:
        kvpress_mm.errors.MissingCheckpointError: the directory has no ``model.safetensors`` (a
            ``FileNotFoundError`` whose message says how to train a checkpoint).

    Returns:
        The ``LlavaForConditionalGeneration`` and its ``LlavaProcessor`` (``processor.tokenizer`` is
        the tokenizer). Prompts of the task generator become inputs with
        :func:`kvpress_mm.apps.reference.render.encode_prompts`, or with the processor itself.

    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    directory = require_checkpoint(path)
    model = LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation=attn_implementation)
    model.eval()
    processor = AutoProcessor.from_pretrained(directory)
    return model, processor
