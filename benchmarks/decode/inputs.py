"""The model and prompts of the decode benchmark: a random LLaVA, prompts of mostly image placeholders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.decode.arms import Config
from benchmarks.harness.models import BOS, llama_config, never_stop_early


def build_model(config: Config) -> Any:
    """The random float32 LLaVA of ``config`` (sdpa, no EOS so generation never stops early)."""
    import transformers

    transformers.logging.set_verbosity_error()
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    text = llama_config(config, config.max_length + config.decode_tokens + 16)
    model_config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=config.image_token_id,
        image_seq_length=config.image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(config.seed)
    model = transformers.LlavaForConditionalGeneration(model_config).float().eval()
    model.set_attn_implementation("sdpa")
    return never_stop_early(model)


def weight_bytes(model: Any) -> int:
    """Bytes of the parameters a decode step reads: the text decoder's layers, final norm and LM head."""
    language_model = model.model.language_model
    modules = [language_model.layers, language_model.norm, model.lm_head]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


@dataclass
class Prompt:
    """A prompt: token ids ``[1, L]`` and the image features its placeholders stand for."""

    input_ids: torch.Tensor
    image_features: list[torch.Tensor]  # one [tokens, hidden] per image, in order

    def generate_kwargs(self) -> dict[str, Any]:
        """What ``generate`` needs besides the ids: the mask and the precomputed image features."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(self.input_ids)}
        if self.image_features:
            features: Any = self.image_features  # a list of [tokens, hidden], one per image
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        return kwargs


def make_prompt(config: Config, length: int) -> Prompt:
    """``length`` tokens, ``round(image_fraction * length)`` of them image placeholders, ending on text.

    Images of at most ``image_tokens`` placeholders alternate with text segments (BOS first);
    deterministic in ``config.seed`` and ``length``.
    """
    generator = torch.Generator().manual_seed(1000 + config.seed + length)
    n_image = min(length - 1, round(config.image_fraction * length))
    n_images = -(-n_image // config.image_tokens) if n_image else 0
    sizes = [n_image // n_images + (i < n_image % n_images) for i in range(n_images)] if n_images else []
    n_text = length - n_image
    texts = [n_text // (n_images + 1) + (i < n_text % (n_images + 1)) for i in range(n_images + 1)]
    ids: list[torch.Tensor] = []
    for i, text in enumerate(texts):
        ids.append(torch.randint(3, config.image_token_id - 1, (text,), generator=generator))
        if i < n_images:
            ids.append(torch.full((sizes[i],), config.image_token_id))
    input_ids = torch.cat(ids)[None]
    input_ids[0, 0] = BOS
    features = [0.02 * torch.randn(n, config.hidden, generator=generator) for n in sizes]
    return Prompt(input_ids, features)
