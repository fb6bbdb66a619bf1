"""Stored KV bytes of one layer with compression, quantization (transformers' QuantizedCache) and both.

A benchmark, not a test: it measures and reports (with PASS / MISS against the target below),
it never fails. Run it from the repository's root as

    .venv/bin/python -m benchmarks.quantized [--length 8192 --ratio 0.8 --caches quanto-4bit fp8 ...]

For each quantized cache configuration, four layers receive the same synthetic prompt keys and
values ``[1, kv_heads, length, head_dim]`` (default 8 KV heads x head_dim 128, bfloat16, random
normal: the bytes a layer stores do not depend on the values) through transformers' own
``update``, as a model's prefill would, then:

- ``full``: a ``DynamicLayer``, uncompressed;
- ``compressed``: a ``DynamicLayer`` compressed by kvpress-mm's ``apply_plan`` (each KV head
  keeps ``int(length * (1 - ratio))`` entries: 1638 of 8192 at 0.8);
- ``quantized``: a quantized layer (quanto / HQQ / fp8) holding the whole prompt;
- ``both``: a quantized layer compressed by ``apply_plan``, as the session does after the
  layer's prefill attention.

The bytes are kvpress-mm's own count (``kvpress_mm.cache.surgery.kv_bytes``: the quantized
store's packed data and group statistics, plus the full-precision residual). The target: "both"
is within 10% of the product of the two savings, ``quantized x compressed / full``. The residual
window of quanto / HQQ (up to ``residual_length - 1`` recent entries kept in full precision,
which compression does not shrink) is accounted for additively: the layers then decode
``residual_length - 1`` tokens, the worst case before transformers flushes the window into the
quantized store, and "both" is compared with ``(quantized - residual) x compressed / full +
residual``. The time to quantize the kept entries is reported too: it is what compression adds
to the prefill, and what each step of decode-time eviction would cost on a quanto / HQQ store
(which is why kvpress-mm refuses that).

Synthetic layers give exact byte counts at 8k tokens in seconds without a model; the tests
check the same counts on tiny models end to end.

Modules: :mod:`~benchmarks.quantized.measure` (the layers and their bytes),
:mod:`~benchmarks.quantized.cli` (the command line, the table, the JSON).
"""
