"""Prefill overhead, peak memory, KV bytes and decode speed of every strategy on a random text model.

A benchmark, not a test: it measures and reports, it never fails on timings. Run it from the
repository's root as

    .venv/bin/python -m benchmarks.prefill_decode [--length 8192 --ratio 0.8 --decode-tokens 32 --repeats 3]

The model is a random ``LlamaForCausalLM`` built from a config (no downloads): hidden 512,
MLP 1536 (3 x hidden), 8 layers, 8 query heads, 2 KV heads (head_dim 64), vocabulary 1024 (so
the LM head does not dominate), float32, ``sdpa``. Every *arm* (``none`` = no compressor, then each strategy) runs
the same greedy ``generate`` on the same random prompt:

- prefill time and decode ms/token are read from a logits processor that timestamps each
  generation step (the first call comes right after the prefill forward). Every strategy run
  sits between two runs without compressor (``none, s1, none, s2, ..., none``, the order
  rotating per repeat); its ratios are taken against the mean of those two neighbours, and
  the median over repeats is reported, so the ratios hold on a shared machine whose load
  drifts. Process CPU times are paired the same way (``cpu ratio``, for information: with one
  thread it is nearly immune to other load; with several, threads waiting at barriers count);
- peak memory is the resident-set high-water mark of the prefill, measured in a fresh process
  per arm (torch CPU allocations are invisible to ``tracemalloc``), with glibc's mmap threshold
  fixed at 128 KiB so that freed tensors leave the resident set: after building the model
  and a short warm-up, the kernel's high-water mark is reset (``/proc/self/clear_refs``) and
  the prefill's peak RSS minus the RSS just before it is reported;
- KV bytes before/after come from ``session.report``; the cache is also measured directly
  right after the prefill (for the ``none`` and ``full`` arms too).

Results are printed as a table (with PASS/MISS per target) and written as JSON.

Modules: :mod:`~benchmarks.prefill_decode.measure` (the arms, their runs, peak memory),
:mod:`~benchmarks.prefill_decode.report` (medians, ratios, targets, the table),
:mod:`~benchmarks.prefill_decode.cli` (the command line).
"""
