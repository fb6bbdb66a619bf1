"""kvpress-mm side by side with NVIDIA kvpress 0.5.5: time and kept entries on the same model and prompt.

    bash benchmarks/setup_kvpress_env.sh                      # once: kvpress in its own venv (transformers < 5.3)
    .venv/bin/python -m benchmarks.kvpress_compare --threads 1   # about 10 minutes on one core

A random-weight ``LlamaForCausalLM`` (by default the text model of :mod:`benchmarks.decode`: hidden
1024, MLP 2816, 8 layers, 16 heads, 16 KV heads, vocabulary 4096, float32) is built once and saved
with ``save_pretrained``; both sides load it from that directory. One random prompt of
``--length`` tokens (default 8192), ratio ``--ratio`` (default 0.8), greedy ``generate`` of
``--decode-tokens`` tokens. Pairs of arms (kvpress-mm in .venv, kvpress in
benchmarks/.kvpress-venv through :mod:`benchmarks.kvpress_compare.kvpress_side`, each in a fresh
process, the order alternating between repeats):

| arm | kvpress-mm | kvpress |
|---|---|---|
| ``baseline`` | no compressor (sdpa) | no press (sdpa) |
| ``snapkv`` | ``snapkv`` window 64, kernel 5, avg pooling | ``SnapKVPress`` (its defaults: window 64, kernel 5, avg) |
| ``streaming`` | ``streaming`` 4 sink tokens | ``StreamingLLMPress`` (n_sink 4) |
| ``h2o`` | ``h2o`` without decode eviction, no window (sdpa) | ``ObservedAttentionPress`` (needs eager attention) |
| ``baseline-eager`` | - | no press (eager): what eager attention alone costs |

``--threads`` sets torch's threads on both sides. Reported: prefill time with compression (ours /
kvpress; target <= 1.0; the ratio of process CPU times with ``--threads 1``, which time slices
lost to other load on a shared machine do not inflate, else of wall times), compression time, decode
ms/token (median step; ours uses the session's GrowingLayer, kvpress transformers' DynamicLayer),
and whether the kept entries are identical (per layer and KV head) for SnapKV and StreamingLLM.
Without the kvpress venv, only kvpress-mm's side runs (and is reported).

Modules: :mod:`~benchmarks.kvpress_compare.arms` (the pairs of arms, the run's settings),
:mod:`~benchmarks.kvpress_compare.ours` (kvpress-mm's side), :mod:`~benchmarks.kvpress_compare.kvpress_side`
(kvpress's side, in its venv), :mod:`~benchmarks.kvpress_compare.report` (kept sets compared,
medians, ratios, tables), :mod:`~benchmarks.kvpress_compare.cli` (the command line, a process per side and arm).
"""
