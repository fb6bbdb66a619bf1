"""Tiny random text models built from configs (no hub, no downloads) for end-to-end tests.

Every builder returns a float32 model in eval mode with 2 layers, 4 query heads, 2 KV heads
(head_dim 16, GQA groups of 2), vocabulary 256, and ``generation_config.eos_token_id = None``
so random weights never stop generation early.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

VOCAB = 256
PAD, BOS = 0, 1

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

#: The tiny text decoder's config, shared by every tiny model (the vision-language ones' text models too).
TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=2,
)


def _config(family: str, **overrides: Any) -> Any:
    import transformers

    kwargs = {**TEXT_CONFIG, **overrides}
    if family == "llama":
        return transformers.LlamaConfig(**kwargs)
    if family == "qwen2":
        return transformers.Qwen2Config(**kwargs)
    if family == "qwen3":
        return transformers.Qwen3Config(**{"head_dim": 16, **kwargs})
    if family == "mistral":
        # Mistral's default sliding_window (4096) would make every layer a sliding layer
        return transformers.MistralConfig(**{"sliding_window": None, **kwargs})
    raise ValueError(f"unknown family {family!r}")


def _model_class(family: str) -> type[nn.Module]:
    import transformers

    return {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[family]


def sharpen_attention(model: nn.Module, factor: float = 6.0) -> nn.Module:
    """Scale q/k projections so attention has structure (default init makes it nearly uniform).

    With structured attention, score-based selections differ between KV heads and layers.
    For Qwen3 (``q_norm``/``k_norm`` normalise q and k per head) the norm weights are scaled.
    """
    with torch.no_grad():
        for layer in model.get_decoder().layers:  # type: ignore[operator]
            attn = layer.self_attn
            if hasattr(attn, "q_norm"):
                attn.q_norm.weight.mul_(factor)
                attn.k_norm.weight.mul_(factor)
            else:
                attn.q_proj.weight.mul_(factor)
                attn.k_proj.weight.mul_(factor)
    return model


def instantiate(
    model_class: type[nn.Module], config: Any, attn_implementation: str, *, seed: int, sharpen: bool
) -> nn.Module:
    """``model_class(config)`` with random weights drawn after ``torch.manual_seed(seed)``, in eval mode.

    Also: ``attn_implementation``, no EOS in the generation config (random weights never stop
    generation early), pad id :data:`PAD`, and with ``sharpen`` :func:`sharpen_attention`.
    """
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.set_attn_implementation(attn_implementation)  # type: ignore[operator]
    model.generation_config.eos_token_id = None  # type: ignore[union-attr]
    model.generation_config.pad_token_id = PAD  # type: ignore[union-attr]
    if sharpen:
        sharpen_attention(model)
    return model


def build(
    family: str = "llama",
    attn_implementation: str = "sdpa",
    *,
    seed: int = 0,
    sharpen: bool = True,
    **config_overrides: Any,
) -> nn.Module:
    """A tiny random ``*ForCausalLM`` of ``family`` (see :data:`FAMILIES`)."""
    config = _config(family, **config_overrides)
    return instantiate(_model_class(family), config, attn_implementation, seed=seed, sharpen=sharpen)


def build_gpt2() -> nn.Module:
    """A tiny GPT-2 (a family no kvpress-mm adapter supports)."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=BOS, eos_token_id=2
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    """``[1, length]`` random token ids (BOS first, avoiding pad/bos/eos elsewhere)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(3, VOCAB, (1, length), generator=generator)
    ids[0, 0] = BOS
    return ids


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A left-padded batch of random prompts: ``(input_ids, attention_mask, [each prompt [1, L]])``."""
    prompts = [prompt(n, seed=seed + i) for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.shape[1] :] = p[0]
        mask[b, width - p.shape[1] :] = 1
    return ids, mask, prompts


def generate(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> Any:
    """Greedy generate returning a dict with scores, raw logits and the cache."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    options: dict[str, Any] = dict(
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    options.update(kwargs)
    generate_fn: Callable[..., Any] = model.generate  # type: ignore[assignment]
    return generate_fn(input_ids, attention_mask=attention_mask, **options)


# -- "left exactly as found" ----------------------------------------------------------------

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def model_snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a compressor session could leave behind on ``model``."""
    from torch.nn.modules import module as module_mod

    config: Any = model.config
    hooks = {
        (name, attr): dict(getattr(sub, attr, {}) or {}) for name, sub in model.named_modules() for attr in _HOOK_DICTS
    }
    global_hooks = {
        attr: dict(getattr(module_mod, attr))
        for attr in dir(module_mod)
        if attr.startswith("_global_") and isinstance(getattr(module_mod, attr), dict)
    }
    # functions set on a module instance (an instrumented method such as a wrapped ``_prefill``)
    instance_functions = {
        name: sorted(key for key, value in vars(sub).items() if callable(value) and not isinstance(value, nn.Module))
        for name, sub in model.named_modules()
    }
    return {
        "config": config.to_dict(),
        "instance_functions": instance_functions,
        "attn_implementation": config._attn_implementation,
        "generation_config": model.generation_config.to_dict(),  # type: ignore[union-attr,operator]
        "hooks": hooks,
        "global_hooks": global_hooks,
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": model.training,
        "module_types": [type(m) for m in model.modules()],
    }


def assert_same_model_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Fail with a precise message where ``after`` differs from ``before``."""
    assert after["attn_implementation"] == before["attn_implementation"]
    assert after["config"] == before["config"]
    assert after["instance_functions"] == before["instance_functions"], "functions left on module instances"
    assert after["generation_config"] == before["generation_config"]
    leftover = {key: hooks for key, hooks in after["hooks"].items() if hooks != before["hooks"].get(key)}
    assert not leftover, f"hooks left on modules: {leftover}"
    assert after["global_hooks"] == before["global_hooks"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in after["tensors"].items():
        assert torch.equal(tensor, before["tensors"][name]), f"parameter/buffer {name} changed"
    assert after["training"] == before["training"]
    assert after["module_types"] == before["module_types"]


def hook_count(model: nn.Module) -> int:
    """Number of forward (pre-)hooks on all modules of ``model``."""
    return sum(len(getattr(sub, attr, {}) or {}) for sub in model.modules() for attr in _HOOK_DICTS[:5])
