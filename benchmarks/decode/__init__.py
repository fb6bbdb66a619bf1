"""Compressed decoding against the full cache, the physical bound (native-K) and transformers' stock cache.

A benchmark, not a test: it measures and reports (PASS / MISS against the targets below), it
never fails on timings. Run it from the repository's root as

    .venv/bin/python -m benchmarks.decode --threads 1   # the whole run (about 25 minutes, one core)
    .venv/bin/python -m benchmarks.decode --quick       # shorter prompts (a few minutes)

The model is a random-weight ``LlavaForConditionalGeneration`` built from a config (nothing
downloaded): its text model is a Llama with hidden 1024, MLP 2816, 8 layers, 16 query heads and
16 KV heads (MHA, head_dim 64), vocabulary 4096, float32, ``sdpa``; a one-layer CLIP tower.
Prompts are 80% image placeholders (``config.image_token_id``, in images of up to 576
tokens between text segments, the prompt ending on text). The image features are passed
precomputed (``mm_encoder_outputs``, what ``generate`` computes from ``pixel_values``), which is
the same for the text decoder and skips the vision tower; the library's LLaVA adapter marks
the placeholders as image entries from ``input_ids``.

Arms (the same LLaVA, greedy decoding):

- the grid: every strategy at every ratio of ``--grid-ratios`` on the ``--grid-length`` prompt
  (``full``, the no-op strategy, once);
- the length sweep: ``full``, ``lookm-pivotal`` and ``snapkv`` at ratio ``--sweep-ratio`` and the
  **native-K** arm - a prompt of ``K = int(L * (1 - r))`` tokens from the start, no compressor:
  the cache a compressed arm holds, at no compression cost - the physical bound of decoding;
  ``--overhead-strategies`` (default ``h2o``) adds strategies at the longest length only (their
  prefill overhead);
- the cache arms at ``--cache-length``: ``full`` with transformers' ``DynamicLayer`` (which
  re-copies the whole cache at every decode step: ``torch.cat``) and with kvpress-mm's
  ``GrowingLayer`` (appends in place), a compressed strategy with either, native-K with either;
- the ragged part at ``--cache-length``: ``adakv`` (``--ragged-strategy``; per-head budgets, stored
  head by head) against its rectangular inner strategy ``snapkv`` (``--ragged-baseline``): KV bytes
  per layer beside what kvpress's masking ``AdaKVPress`` keeps (the full cache) and what a layout
  padded to each layer's longest head would keep, and the decode time of the per-head attention
  against the rectangular one.

Compressed arms use the session's default (compressed layers become ``GrowingLayer`` s) unless
their cache is ``stock`` (``compressor(model, growing_cache=False)``). An uncompressed arm with
the growing cache (``full`` or native-K) is not prefilled again: its cache is the stock arm's
keys and values copied into ``GrowingLayer`` s (``GrowingLayer.from_tensors``), exactly what a
prefill into ``growing_dynamic_cache`` holds; only its decoding is measured.

One fresh Python process per prompt length ``L`` (native-K arms with the ``L`` they stand for;
``--isolation inline`` runs everything in this process). While prefilling, glibc's mmap threshold
is fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set and
RSS growth measures what a step needs; while decoding, at 32 MiB, the ceiling of glibc's dynamic
threshold, which a long-running process reaches (a stock cache's per-step ``torch.cat`` then
reuses heap memory below that size instead of faulting in fresh pages at every step).

- **prefills**, one arm after the other (``full`` before the compressed arms): a warm-up on a
  short prompt, then the measured prefill (``generate`` of one token): prefill time (start of
  ``generate`` to the first logits, compression included; wall and process CPU time),
  compression time (measured directly: the session's planning and cache surgery, summed over
  layers), the RSS high-water growth of the prefill and of each layer's compression step (the
  largest over layers; the kernel's high-water mark is reset first), KV bytes (held, and
  allocated including a growing layer's headroom). Each cache stays in memory;
- **decoding**: every arm of that length decodes ``--decode-tokens`` tokens greedily, one step
  (``--decode-burst``) at a time in turn, in a rotating order, so that the ms/token of arms compared with
  each other are measured under the same load (the machine is shared: load varies by the
  minute). Decode ms/token is the median step.

Compression overhead = prefill with compression / prefill of ``full`` at the same length (in the
same process, minutes apart): with ``--threads 1`` the ratio of process CPU times (immune to
time slices lost to other processes), else of wall times; the direct ratio
``1 + compression / (prefill - compression)`` is printed beside it.

Results: a table per part on stdout, JSON, and a PNG plot (decode ms/token against prompt
length, one line per arm of the sweep; beside it the peak memory of the compression step
against prompt length).

Modules, in the order a run goes through them: :mod:`~benchmarks.decode.arms` (the settings, the
arms of every part), :mod:`~benchmarks.decode.inputs` (the LLaVA, its prompts),
:mod:`~benchmarks.decode.prefill` and :mod:`~benchmarks.decode.decoding` (the measurements),
:mod:`~benchmarks.decode.processes` (a process per prompt length), then one module per part of
the report - :mod:`~benchmarks.decode.grid`, :mod:`~benchmarks.decode.sweep` (with the native-K
bound and the compression overhead), :mod:`~benchmarks.decode.memory`,
:mod:`~benchmarks.decode.caches`, :mod:`~benchmarks.decode.ragged` - assembled by :mod:`~benchmarks.decode.report`, and
:mod:`~benchmarks.decode.plot`; :mod:`~benchmarks.decode.cli` is the command line.
"""
