"""A random-weight tiny LLaVA built in code, with its processor (no download).

The commands' default model is the trained reference VLM (:mod:`kvpress_mm.apps.reference`); this
one stays for what needs a LLaVA of any shape in seconds: the test suite writes it to disk
(``save``) as a local model directory for ``kvpress-mm run`` and ``bench fidelity --model``,
with bigger prompts (16 tokens per image, a general vocabulary) than the reference model's. It is
a real ``LlavaForConditionalGeneration`` (CLIP vision tower, projector, Llama text decoder)
with a real ``LlavaProcessor`` (a word-level tokenizer built from
:data:`kvpress_mm.apps.prompts.VOCABULARY` and the PIL CLIP image processor), so prompts go through
exactly the code path a downloaded LLaVA takes: images become ``pixel_values`` and
``config.image_token_id`` placeholders, one per vision-tower patch.

Its weights are RANDOM. transformers' initialisation makes attention nearly uniform, which
would make every strategy look alike, so three things give it structure:

- the ``q_proj`` / ``k_proj`` weights are multiplied by ``attention_sharpness`` (attention
  logits grow by its square): each query attends strongly to a few keys;
- the first token (``<s>``) is made an attention sink, as in trained LLMs: it carries a massive
  activation in one hidden dimension, the slowest-rotating RoPE dimensions of each head's key
  read that dimension only, and the query bias points along them, so every query gives the
  first token a logit bonus of about ``sink_logit`` wherever it stands in the prompt;
- the output projection is multiplied by ``output_sharpness``, so next-token distributions
  are peaked (entropy about 3 nats), as a trained model's are, rather than nearly uniform.

What its numbers show: how much KV memory each strategy releases, the cost of a decode step,
and how far each strategy moves the model's next-token distributions away from the full
cache on a model whose attention has sinks and peaks. What they do not show: answer quality.
The weights know nothing about images or words, so "agreement" is not accuracy, and a
strategy's rank here need not be its rank on a trained model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvpress_mm.apps.prompts import VOCABULARY

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)


@dataclass(frozen=True)
class EmbeddedModelConfig:
    """Shape, seed and attention structure of the embedded model.

    Attributes:
        num_layers: text decoder layers.
        hidden_size: text model width; ``head_dim = hidden_size // num_heads``.
        num_heads: query heads per layer.
        num_kv_heads: KV heads per layer (grouped-query attention when fewer than ``num_heads``).
        image_size: the vision tower's input size in pixels (images are resized to it).
        patch_size: vision patch size; ``(image_size // patch_size) ** 2`` tokens per image.
        vision_hidden_size: width of the CLIP vision tower.
        attention_sharpness: factor on the ``q_proj`` and ``k_proj`` weights.
        sink_logit: attention-logit bonus every query gives the first token (0 = no sink).
        output_sharpness: factor on the output projection (``lm_head``), so next-token
            distributions are peaked as a trained model's are, not nearly uniform.
        seed: seed of the weights.

    """

    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 8
    num_kv_heads: int = 2
    image_size: int = 56
    patch_size: int = 14
    vision_hidden_size: int = 64
    attention_sharpness: float = 4.0
    sink_logit: float = 6.0
    output_sharpness: float = 8.0
    seed: int = 0

    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens per image (the CLS token is dropped)."""
        return (self.image_size // self.patch_size) ** 2

    def describe(self) -> str:
        """A one-line description of the model."""
        return (
            f"embedded random-weight LlavaForConditionalGeneration (CLIP {self.image_size}px / patch "
            f"{self.patch_size} = {self.tokens_per_image} tokens per image; Llama {self.num_layers} layers, hidden "
            f"{self.hidden_size}, {self.num_heads} heads / {self.num_kv_heads} KV heads); q/k weights "
            f"x{self.attention_sharpness:g}, first-token sink +{self.sink_logit:g} logits, output x"
            f"{self.output_sharpness:g}, seed {self.seed}"
        )


def build_tokenizer(extra_special_tokens: Sequence[str] = ()) -> Any:
    """A word-level fast tokenizer over :data:`VOCABULARY` that prepends ``<s>``.

    ``extra_special_tokens`` (e.g. another family's image placeholders) are added to the
    vocabulary as special tokens, matched whole even without spaces around them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIAL_TOKENS, *extra_special_tokens]
    vocab = {token: index for index, token in enumerate(dict.fromkeys([*specials, *VOCABULARY]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    if extra_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    return tokenizer


def build_processor(config: EmbeddedModelConfig | None = None) -> Any:
    """The embedded model's ``LlavaProcessor`` (word-level tokenizer, PIL CLIP image processor)."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    config = config or EmbeddedModelConfig()
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": config.image_size}, crop_size={"height": config.image_size, "width": config.image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )


def build_model(config: EmbeddedModelConfig | None = None, processor: Any = None) -> torch.nn.Module:
    """The seeded random ``LlavaForConditionalGeneration`` with structured attention, float32, eval mode.

    End-of-sequence is disabled in its generation config (random weights would stop at
    random), so a generation runs for ``max_new_tokens`` steps.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = config or EmbeddedModelConfig()
    if config.hidden_size % config.num_heads or config.num_heads % config.num_kv_heads:
        raise ValueError(
            f"hidden_size ({config.hidden_size}) must be a multiple of num_heads ({config.num_heads}), "
            f"and num_heads a multiple of num_kv_heads ({config.num_kv_heads})"
        )
    tokenizer = (processor or build_processor(config)).tokenizer
    vocab_size = -(-len(tokenizer) // 64) * 64
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden_size,
        intermediate_size=2 * config.vision_hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=2 * config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=4096,
        attention_bias=True,  # the query bias carries the sink; the other biases stay zero
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    llava_config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=config.tokens_per_image,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlavaForConditionalGeneration(llava_config).eval()
    _structure_attention(model, config, int(tokenizer.bos_token_id))
    with torch.no_grad():
        head = model.get_output_embeddings()
        if head.weight is model.get_input_embeddings().weight:  # tied: untie before scaling
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
        head.weight.mul_(config.output_sharpness)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    return model


#: The hidden dimension that carries the first token's massive activation.
SINK_DIMENSION = 0


@torch.no_grad()
def _structure_attention(model: Any, config: EmbeddedModelConfig, bos_id: int) -> None:
    """Sharpen attention (q/k weights) and make the first token an attention sink.

    The sink is built the way trained LLMs build theirs: the first token carries a massive
    activation in one hidden dimension (:data:`SINK_DIMENSION`), so after each layer's RMSNorm
    it is nearly a one-hot vector, unlike every other token. In each head, the slowest-rotating
    RoPE dimensions of the key read only that hidden dimension, and the query bias points along
    them: every query then gives the first token a logit bonus of ``sink_logit``, wherever it
    stands, and every other token about ``sink_logit / sqrt(hidden_size)`` times a standard
    normal draw.
    """
    layers = model.model.language_model.layers
    head_dim = config.hidden_size // config.num_heads
    groups = config.num_heads // config.num_kv_heads
    # RoPE pairs dimension i with i + head_dim/2 and rotates pair i by position * theta^(-2i/head_dim):
    # the last quarter of the pairs turns by less than ~0.1 rad over 1,000 positions
    slow = torch.zeros(head_dim, dtype=torch.bool)
    quarter = max(1, head_dim // 8)
    slow[head_dim // 2 - quarter : head_dim // 2] = True
    slow[head_dim - quarter :] = True
    slow_rows = slow.repeat(config.num_kv_heads)  # [kv_heads * head_dim]
    for layer in layers:
        attention = layer.self_attn
        attention.q_proj.weight.mul_(config.attention_sharpness)
        attention.k_proj.weight.mul_(config.attention_sharpness)
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
            projection.bias.zero_()
        if config.sink_logit:
            kept = attention.k_proj.weight[slow_rows, SINK_DIMENSION].clone()
            attention.k_proj.weight[slow_rows] = 0.0
            attention.k_proj.weight[slow_rows, SINK_DIMENSION] = kept
    if config.sink_logit == 0:
        return
    embeddings = model.get_input_embeddings().weight  # [vocab, hidden]
    embeddings[bos_id, SINK_DIMENSION] = 50.0 * float(embeddings.std()) * config.hidden_size**0.5
    # the first token at position 0 only attends to itself, so its hidden state at each layer
    # does not depend on the query biases set below: one forward gives every layer's input
    hidden = model.model.language_model(input_ids=torch.tensor([[bos_id]]), output_hidden_states=True).hidden_states
    for index, layer in enumerate(layers):
        attention = layer.self_attn
        key = attention.k_proj(layer.input_layernorm(hidden[index][0, 0])).view(config.num_kv_heads, head_dim)
        key = key * slow  # [kv_heads, head_dim], zero outside the slow pairs
        norms = key.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        # bias . key * scaling = sink_logit  =>  bias = key / |key|^2 * sink_logit / scaling
        bias = key / norms**2 * (config.sink_logit / float(attention.scaling))
        attention.q_proj.bias.copy_(bias.repeat_interleave(groups, dim=0).flatten())


def build(config: EmbeddedModelConfig | None = None) -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` of the embedded tiny model."""
    config = config or EmbeddedModelConfig()
    processor = build_processor(config)
    return build_model(config, processor), processor


def save(directory: str, config: EmbeddedModelConfig | None = None) -> str:
    """Write the embedded model and its processor to ``directory`` (``save_pretrained``); return it.

    The directory then loads like any local model: ``kvpress-mm run --model directory ...``.
    """
    model, processor = build(config)
    saver: Any = model
    saver.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
