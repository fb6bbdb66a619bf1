"""The keynorm plugin, installed: discovered through its entry point, compresses under generate.

These tests need the distribution installed (``pip install -e examples/kvpress-mm-keynorm``):
discovery goes through the package metadata, exactly as for any published plugin.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pydantic
import pytest
import torch
import transformers
from kvpress_mm import Compressor, list_strategies
from kvpress_mm.apps.cli import main as kvpress_mm_cli
from kvpress_mm.registry import DISABLE_AUTOLOAD_ENV, reset_registry, strategy_infos

import kvpress_mm_keynorm
from kvpress_mm_keynorm import KeyNorm

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16


@pytest.fixture(autouse=True)
def plugins_autoloaded(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Plugin discovery on (whatever the environment says) and a fresh registry per test."""
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    reset_registry()
    yield
    reset_registry()


def tiny_llama() -> transformers.LlamaForCausalLM:
    """A random 2-layer Llama with grouped-query attention, built from a config (no download)."""

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # random weights must not stop early
    model.generation_config.pad_token_id = 0
    return model


def prompt(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(length))
    return input_ids, torch.ones_like(input_ids)


# -- discovery -----------------------------------------------------------------------------


# --8<-- [start:listed]
def test_listed_by_list_strategies_as_a_plugin() -> None:
    assert "keynorm" in list_strategies()
    info = next(info for info in strategy_infos() if info.name == "keynorm")
    assert info.cls is KeyNorm
    assert not info.builtin
    assert "kvpress-mm-keynorm" in info.origin  # the distribution
    assert "kvpress_mm_keynorm" in info.origin  # the module of the entry point
    # the built-ins are still there
    assert {"h2o", "snapkv", "lookm-pivotal"} <= set(list_strategies())


# --8<-- [end:listed]


def test_listed_by_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert kvpress_mm_cli(["strategies", "--json"]) == 0
    records = {record["name"]: record for record in json.loads(capsys.readouterr().out)}
    keynorm = records["keynorm"]
    assert keynorm["builtin"] is False
    assert keynorm["class"] == "kvpress_mm_keynorm.keynorm.KeyNorm"
    assert keynorm["config"]["window_size"]["default"] == 0
    assert keynorm["description"].startswith("Keeps the entries whose keys have the smallest L2 norm")


def test_config_validates_and_round_trips() -> None:
    compressor = Compressor.from_name("keynorm", compression_ratio=0.75, window_size=8)
    assert isinstance(compressor, KeyNorm)
    assert compressor.name == "keynorm"
    assert compressor.to_config() == {"strategy": "keynorm", "compression_ratio": 0.75, "window_size": 8}
    assert Compressor.from_config(compressor.to_config()) == compressor
    with pytest.raises(pydantic.ValidationError, match="window_size"):
        Compressor.from_name("keynorm", window_size=-1)
    with pytest.raises(pydantic.ValidationError, match="compression_ratio"):
        Compressor.from_name("keynorm", compression_ratio=1.0)
    assert kvpress_mm_keynorm.__version__ == "0.1.0"


# -- compression under generate ------------------------------------------------------------


# --8<-- [start:generate]
def expected_kept(keys: torch.Tensor, n_keep: int, window: int) -> torch.Tensor:
    """Positions one KV head keeps: the ``n_keep - window`` lowest-norm keys before the window, then the window.

    ``keys`` is ``[seq, head_dim]`` (one head of the full, uncompressed cache).
    """
    length = keys.shape[0]
    norms = keys.float().norm(dim=-1)[: length - window]
    lowest = (-norms).topk(n_keep - window).indices.sort().values
    return torch.cat([lowest, torch.arange(length - window, length)])


@pytest.mark.parametrize(("length", "ratio", "window"), [(24, 0.5, 4), (40, 0.8, 0), (30, 0.75, 2)])
def test_generate_keeps_the_lowest_norm_keys_outside_the_window(length: int, ratio: float, window: int) -> None:
    model = tiny_llama()
    input_ids, attention_mask = prompt(length)
    n_keep = int(length * (1 - ratio))
    new_tokens = 3

    # the uncompressed prompt cache: the prefill under compression sees exactly these keys
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask, use_cache=True).cache

    compressor = Compressor.from_name("keynorm", compression_ratio=ratio, window_size=window)
    with torch.no_grad(), compressor(model) as session:
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )

    assert out.sequences.shape == (1, length + new_tokens)
    assert session.report.n_keep == (n_keep,)
    assert session.report.layers_compressed == LAYERS
    assert session.report.kv_bytes_after < session.report.kv_bytes_before
    for layer_idx in range(LAYERS):
        keys = out.cache.layers[layer_idx].keys  # [batch, kv_heads, seq, head_dim]
        values = out.cache.layers[layer_idx].values
        full_keys = full.layers[layer_idx].keys
        full_values = full.layers[layer_idx].values
        # n_keep prompt entries, then the generated tokens but the last (it is never fed back)
        assert keys.shape == (1, KV_HEADS, n_keep + new_tokens - 1, HEAD_DIM), layer_idx
        for head in range(KV_HEADS):
            kept = expected_kept(full_keys[0, head], n_keep, window)
            torch.testing.assert_close(keys[0, head, :n_keep], full_keys[0, head, kept], rtol=0, atol=0)
            torch.testing.assert_close(values[0, head, :n_keep], full_values[0, head, kept], rtol=0, atol=0)
            # stated as a property: outside the window, no evicted key is smaller than a kept one
            norms = full_keys[0, head].norm(dim=-1)
            outside = torch.zeros(length, dtype=torch.bool)
            outside[: length - window] = True
            is_kept = torch.zeros(length, dtype=torch.bool)
            is_kept[kept] = True
            assert bool(is_kept[length - window :].all())
            assert norms[is_kept & outside].max() <= norms[~is_kept & outside].min()


# --8<-- [end:generate]


def test_compressed_generation_continues_without_error_on_a_padded_batch() -> None:
    model = tiny_llama()
    lengths = [20, 12]
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = prompt(length)[0]
        attention_mask[row, width - length :] = 1
    compressor = Compressor.from_name("keynorm", compression_ratio=0.5, window_size=2)
    with torch.no_grad(), compressor(model) as session:
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, width + 4)
    assert session.report.n_keep == (10, 6)
