"""Word-level tokenizers built in memory for the tiny models (no hub, no files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def word_level_tokenizer(words: Sequence[str], extra_ids: Mapping[str, int], special: Mapping[str, str]) -> Any:
    """A ``PreTrainedTokenizerFast``: ``words[i]`` is id ``i``, ``extra_ids`` at their ids, ``<unk>`` 249.

    ``words`` starts with ``<pad>``, ``<s>``, ``</s>``; ``special`` are the tokenizer's extra special
    tokens (e.g. ``{"image_token": "<image>"}``), so that they split from the words around them.
    Padding is on the left, as ``generate`` expects.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(words)}
    vocab.update({"<unk>": 249, **extra_ids})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=dict(special),
        padding_side="left",
    )
