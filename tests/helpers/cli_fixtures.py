"""Local model directories and images for the command tests (built in code, written with save_pretrained).

Also :func:`run_cli`, which runs a command as the console script does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvpress_mm.apps.embedded_model import EmbeddedModelConfig, build_tokenizer, save
from kvpress_mm.apps.prompts import synthetic_image
from tests.helpers.tiny_models import TEXT_CONFIG

#: A smaller embedded model: 2 layers, 16 tokens per image, 2 KV heads of head_dim 32.
TINY = EmbeddedModelConfig(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2)
#: KV bytes per prompt entry of :data:`TINY`: layers x (keys + values) x KV heads x head_dim x 4 bytes.
TINY_BYTES_PER_ENTRY = 2 * 2 * 2 * 32 * 4


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """``main(argv)`` as the console script runs it, each argument as text: (exit code, stdout, stderr)."""
    from kvpress_mm.apps.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse: --help, --version and usage errors
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def quiet_transformers() -> None:
    """No progress bars or info logs from transformers while saving and loading."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def save_tiny_llava(directory: Path) -> Path:
    """A tiny random LLaVA with its processor, as ``save_pretrained`` writes them."""
    quiet_transformers()
    save(str(directory), TINY)
    return directory


def save_tiny_text_model(directory: Path) -> Path:
    """A tiny random Llama (text only) with a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    tokenizer = build_tokenizer()
    config = LlamaConfig(**_text_config(tokenizer))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_images(directory: Path) -> list[Path]:
    """Two small PNG pictures and a file that is not an image (``bad.png``)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "a.png", directory / "b.png"]
    synthetic_image("red", "circle", "blue", pixels=64).save(paths[0])
    synthetic_image("green", "square", "white", pixels=48).save(paths[1])
    (directory / "bad.png").write_text("not an image")
    return paths


def _text_config(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    """The tiny text decoder's config (:data:`tiny_models.TEXT_CONFIG`) with ``tokenizer``'s vocabulary and ids."""
    return dict(
        TEXT_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _save_with_tokenizer(directory: Path, model: torch.nn.Module, tokenizer: object, image_processor: object) -> Path:
    model.generation_config.eos_token_id = None  # type: ignore[union-attr]
    model.save_pretrained(directory)  # type: ignore[operator]
    tokenizer.save_pretrained(directory)  # type: ignore[attr-defined]
    image_processor.save_pretrained(directory)  # type: ignore[attr-defined]
    return directory


def save_tiny_qwen2_vl(directory: Path) -> Path:
    """A tiny random Qwen2-VL with a tokenizer and the PIL image processor (no Qwen2VLProcessor: torchvision)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    quiet_transformers()
    tokenizer = build_tokenizer(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"])
    ids = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"])
    text = _text_config(
        tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    )
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)  # fmt: skip
    config = Qwen2VLConfig(text_config=text, vision_config=vision, vision_start_token_id=ids[0], image_token_id=ids[1],
                           vision_end_token_id=ids[2], video_token_id=ids[3])  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                               temporal_patch_size=2)  # fmt: skip
    return _save_with_tokenizer(directory, model, tokenizer, image_processor)


def save_tiny_internvl(directory: Path) -> Path:
    """A tiny random InternVL with a tokenizer and the PIL image processor (no InternVLProcessor: torchvision)."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        Qwen2Config,
    )

    quiet_transformers()
    tokenizer = build_tokenizer(["<img>", "</img>", "<IMG_CONTEXT>"])
    text = Qwen2Config(**_text_config(tokenizer))
    vision = InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  image_size=[56, 56], patch_size=[14, 14])  # fmt: skip
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    image_processor = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True, max_patches=4)
    return _save_with_tokenizer(directory, model, tokenizer, image_processor)
