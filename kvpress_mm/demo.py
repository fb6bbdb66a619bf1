"""The embedded demo behind ``kvpress-mm demo``: a tiny seeded random Llama and a strategy run on it.

Nothing is downloaded: the model is a ``LlamaForCausalLM`` built from a config in code, with
random weights drawn from a fixed seed. Random weights give nearly uniform attention, so the
builder multiplies the ``q_proj`` and ``k_proj`` weights by ``attention_sharpness`` (attention
logits grow by its square) to give attention some structure to select on.

The numbers a demo run gives are mechanics on a random model - how much KV memory each strategy
releases, how long a decode step takes, how often the greedy continuation stays the same as
with the full cache - not answer quality, which needs a trained model and a benchmark.

```python
from kvpress_mm.demo import run_demo

result = run_demo(["full", "snapkv", "lookm-pivotal"], compression_ratio=0.8)
for row in result.rows:
    print(row.strategy, row.kv_bytes_after, row.agreement)
```
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvpress_mm.cache_surgery import kv_bytes
from kvpress_mm.compressor import Compressor

#: The strategies ``kvpress-mm demo`` runs when none are named (``full`` is the reference).
DEFAULT_STRATEGIES = (
    "full",
    "random",
    "streaming",
    "h2o",
    "snapkv",
    "lookm-evict",
    "lookm-average",
    "lookm-pivotal",
    "lookm-weighted",
)

#: The reference strategy every other one is compared with.
REFERENCE = "full"

RANDOM_MODEL_NOTE = (
    "This is a tiny RANDOM-WEIGHT model (built in code, nothing downloaded): the table shows KV memory, "
    "decode speed and agreement with the full cache on a random model, NOT answer quality."
)


@dataclass(frozen=True)
class DemoModelConfig:
    """Shape and seed of the demo model (a ``LlamaForCausalLM`` with grouped-query attention).

    Attributes:
        num_layers: decoder layers.
        hidden_size: model width; ``head_dim = hidden_size // num_heads``.
        num_heads: query heads per layer.
        num_kv_heads: KV heads per layer (grouped-query attention when fewer than ``num_heads``).
        vocab_size: vocabulary size; ids 0-2 are pad / bos / eos and never appear in prompts.
        attention_sharpness: factor on the ``q_proj`` and ``k_proj`` weights, so attention
            logits are ``attention_sharpness ** 2`` times larger than at initialisation.
        seed: seed of the weights and of the prompt.

    """

    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 8
    num_kv_heads: int = 2
    vocab_size: int = 1024
    attention_sharpness: float = 4.0
    seed: int = 0

    def describe(self) -> str:
        """A one-line description of the model."""
        return (
            f"random-weight LlamaForCausalLM, {self.num_layers} layers, hidden {self.hidden_size}, "
            f"{self.num_heads} heads / {self.num_kv_heads} KV heads, vocab {self.vocab_size}, "
            f"q/k weights x{self.attention_sharpness:g}, seed {self.seed}"
        )


def build_demo_model(config: DemoModelConfig | None = None) -> torch.nn.Module:
    """A seeded random ``LlamaForCausalLM`` in float32 and eval mode, ready for greedy ``generate``.

    End-of-sequence is disabled in its generation config, so a generation always runs for
    ``max_new_tokens`` steps.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = config or DemoModelConfig()
    if config.hidden_size % config.num_heads or config.num_heads % config.num_kv_heads:
        raise ValueError(
            f"hidden_size ({config.hidden_size}) must be a multiple of num_heads ({config.num_heads}), "
            f"and num_heads a multiple of num_kv_heads ({config.num_kv_heads})"
        )
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=2 * config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=8192,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(llama_config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(config.attention_sharpness)
            layer.self_attn.k_proj.weight.mul_(config.attention_sharpness)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = llama_config.pad_token_id
    model.generation_config.do_sample = False
    return model


def demo_prompt(length: int, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of one prompt of ``length`` seeded random tokens: ``input_ids`` and ``attention_mask``."""
    if length < 1:
        raise ValueError(f"the prompt needs at least 1 token, got prompt_length={length}")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (1, length), generator=generator)
    input_ids[0, 0] = 1  # bos
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@dataclass
class DemoRow:
    """One strategy's run.

    Attributes:
        strategy: registered name.
        config: the strategy's full config (``Compressor.to_config()``).
        kv_bytes_before: KV-cache bytes of the prompt before compression.
        kv_bytes_after: KV-cache bytes of the prompt after compression
            (``session.report.kv_bytes_after``; equal to ``kv_bytes_before`` for ``full``).
        kv_bytes_end: KV-cache bytes when generation ends (prompt plus generated tokens;
            ``h2o`` with decode eviction stays at its budget).
        decode_ms_per_token: wall time of a decode step, averaged over the steps after the first token.
        agreement: fraction of generated tokens identical, position by position, to the
            ``full`` run's tokens.
        matching_prefix: generated tokens identical to the ``full`` run's before the first difference.
        tokens: the generated token ids.

    """

    strategy: str
    config: dict[str, Any]
    kv_bytes_before: int
    kv_bytes_after: int
    kv_bytes_end: int
    decode_ms_per_token: float
    agreement: float
    matching_prefix: int
    tokens: list[int] = field(repr=False)

    @property
    def kept_fraction(self) -> float:
        """``kv_bytes_after / kv_bytes_before``."""
        return self.kv_bytes_after / self.kv_bytes_before if self.kv_bytes_before else 1.0


@dataclass
class DemoResult:
    """A whole demo run: the setting and one :class:`DemoRow` per strategy (``full`` first)."""

    model: str
    prompt_length: int
    new_tokens: int
    compression_ratio: float
    rows: list[DemoRow]
    note: str = RANDOM_MODEL_NOTE

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (with ``kept_fraction`` added to each row)."""
        data = asdict(self)
        for row, row_data in zip(self.rows, data["rows"]):
            row_data["kept_fraction"] = row.kept_fraction
        return data


class _StepClock:
    """A stopping criterion that never stops: it records when each token was produced."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def ms_per_decode_step(self) -> float:
        """Mean time between consecutive tokens (the first token comes from the prefill)."""
        if len(self.times) < 2:
            return float("nan")
        return 1000 * (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def _cache_bytes(output: Any) -> int:
    """KV bytes of the cache a model or generate output carries (``cache``, ``past_key_values`` before 5.24)."""
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = output["past_key_values"]
    return sum(kv_bytes(layer) for layer in cache.layers)


def _generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int) -> tuple[list[int], int, float]:
    """Greedy generation: (new token ids, cache bytes at the end, decode ms per token)."""
    from transformers import StoppingCriteriaList

    clock = _StepClock()
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([clock]),
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens, _cache_bytes(out), clock.ms_per_decode_step()


def run_demo(
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    compression_ratio: float = 0.8,
    prompt_length: int = 512,
    new_tokens: int = 32,
    model_config: DemoModelConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Generate greedily on the demo model under each strategy and compare with the full cache.

    ``full`` is always run first, as the reference (added if ``strategies`` omits it).
    Every strategy is built with ``Compressor.from_name(name, compression_ratio=...)`` before
    anything runs, so a bad name or ratio fails fast.

    Args:
        strategies: registered strategy names.
        compression_ratio: fraction of the prompt's cache entries removed, ``0 <= r < 1``.
        prompt_length: tokens in the prompt.
        new_tokens: tokens generated per strategy (at least 1).
        model_config: the demo model (default :class:`DemoModelConfig`).
        progress: called with a short message before each strategy runs.

    Raises:
        kvpress_mm.errors.UnknownStrategyError: a name is not registered.
        pydantic.ValidationError: ``compression_ratio`` is out of range.
        ValueError: ``prompt_length`` or ``new_tokens`` is below 1.

    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    names = [REFERENCE, *dict.fromkeys(n for n in strategies if n != REFERENCE)]
    compressors = {name: Compressor.from_name(name, compression_ratio=compression_ratio) for name in names}
    model_config = model_config or DemoModelConfig()
    inputs = demo_prompt(prompt_length, model_config.vocab_size, model_config.seed)
    model = build_demo_model(model_config)
    with torch.no_grad():
        # prompt cache size, measured; this also warms up lazy imports and kernels before timing
        prompt_bytes = _cache_bytes(model(**inputs, use_cache=True))
    _generate(model, inputs, min(new_tokens, 2))

    rows: list[DemoRow] = []
    reference: list[int] = []
    for name, compressor in compressors.items():
        if progress is not None:
            progress(f"running {name} ...")
        with compressor(model) as session:
            tokens, end_bytes, ms = _generate(model, inputs, new_tokens)
        report = session.report
        compressed = report.layers_compressed > 0
        if name == REFERENCE:
            reference = tokens
        same = [a == b for a, b in zip(tokens, reference)]
        prefix = same.index(False) if False in same else len(same)
        rows.append(
            DemoRow(
                strategy=name,
                config=compressor.to_config(),
                kv_bytes_before=report.kv_bytes_before if compressed else prompt_bytes,
                kv_bytes_after=report.kv_bytes_after if compressed else prompt_bytes,
                kv_bytes_end=end_bytes,
                decode_ms_per_token=ms,
                agreement=sum(same) / len(same),
                matching_prefix=prefix,
                tokens=tokens,
            )
        )
    return DemoResult(
        model=model_config.describe(),
        prompt_length=prompt_length,
        new_tokens=new_tokens,
        compression_ratio=compression_ratio,
        rows=rows,
    )
