"""Peak memory of a chunked prefill against prompt length, beside the same strategy prefilled in one call.

A benchmark, not a test: it measures and reports, it never fails. Run it from the repository's
root as

    .venv/bin/python -m benchmarks.chunked_prefill [--lengths 4096 8192 16384 32768 --threads 1]

The model is a random ``LlamaForCausalLM`` built from a config (no downloads), small enough that
a 32k-token prefill takes about a minute on one CPU thread and large enough that its KV cache is
visible next to the activations: hidden 256, MLP 512, 4 layers, 8 query heads and 8 KV heads
(head_dim 32), vocabulary 256, float32, ``sdpa``; the uncompressed cache takes 8 KiB per token
(256 MiB at 32k). Three arms prefill the same random prompt (``generate`` of one token), each
length in a fresh process per arm (glibc's mmap threshold fixed at 128 KiB so that freed tensors
leave the resident set):

- ``snapkv``: SnapKV, the prompt in one call (each layer is compressed right after its attention,
  so while layer ``l`` attends it holds the whole prompt and layers ``< l`` their budget);
- ``chunked-prefill:snapkv``: the same SnapKV, the prompt in chunks of ``--chunk-size``, every
  layer compressed after each chunk to the budget of the prompt seen so far;
- ``decoding:chunked-prefill:snapkv``: the same, with ``decoding``'s bound of ``--max-entries``
  per layer (a layer whose budget reaches it is compressed to ``max_entries - interval``).

Reported per arm and length: peak KV bytes (``session.report.kv_bytes_peak``: the most bytes the
cache's keys and values held at once, measured at every layer's attention), KV bytes after the
prefill, the difference (what the prefill holds above its result), the resident-set high-water
growth of the prefill (``/proc/self/status`` VmHWM after ``clear_refs``; model and prompt are
built before), and the prefill time. Each series gets a least-squares line (bytes per prompt
token): the one-call arm grows with the prompt, the chunked arm with the budget (``1 - r`` of it)
plus one chunk, and the bounded arm is flat once the budget reaches the bound.

Modules: :mod:`~benchmarks.chunked_prefill.measure` (the arms, one process each),
:mod:`~benchmarks.chunked_prefill.report` (fits, the table, Markdown), :mod:`~benchmarks.chunked_prefill.cli`.
"""
