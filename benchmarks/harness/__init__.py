"""The measurement machinery every benchmark shares, one module per concern.

- :mod:`~benchmarks.harness.memory`: the resident set and its kernel high-water mark
  (``/proc/self/status``, reset with ``/proc/self/clear_refs``), ``ru_maxrss`` where those are
  unavailable, glibc's allocator settings that make RSS growth measure what a step needs, the
  bytes a cache holds;
- :mod:`~benchmarks.harness.models`: the random text model of a benchmark's shape
  (``LlamaConfig``, its command-line options), random prompts, a saved model loaded back;
- :mod:`~benchmarks.harness.runs`: a timed greedy ``generate`` (``StepTimer``), the compression
  probe that times kvpress-mm's compression step from outside the library, a fresh process per
  arm (``run_worker``, with progress lines);
- :mod:`~benchmarks.harness.reports`: the machine and git revision a run measured on, medians and
  ratios, cells of fixed-width and Markdown tables, the JSON written, the command line's parser.

Only the standard library is imported at the top of these modules: torch, transformers and
kvpress_mm are imported inside the functions that need them, so that ``--help`` stays fast and a
worker pays only for what it uses. The kvpress side of ``kvpress_compare`` runs in
benchmarks/.kvpress-venv (transformers < 5.3, no kvpress_mm): what it uses
(``models.load_saved``, ``runs.greedy_options``, ``runs.StepTimer``) must work there.
"""

from pathlib import Path

#: The repository: workers run ``python -m benchmarks.<name>`` from here.
REPO = Path(__file__).resolve().parent.parent.parent
#: Where the benchmarks write by default (``benchmarks/results/``, not versioned).
RESULTS = REPO / "benchmarks" / "results"
