"""The performance benchmarks of kvpress-mm: each prints tables and writes JSON, none is a test.

Run from the repository's root, as modules of this package (it is not installed):

    .venv/bin/python -m benchmarks.prefill_decode   # every strategy's prefill overhead, memory, KV bytes
    .venv/bin/python -m benchmarks.decode           # decoding against the full cache and native-K
    .venv/bin/python -m benchmarks.kvpress_compare  # side by side with NVIDIA kvpress

Each benchmark is a subpackage: its ``__init__`` says what it measures and how, ``cli`` is its
command line (``--help``), the other modules its parts. What they share - processes per arm,
RSS and peak-memory measurement, the timed ``generate``, the random models, the machine and git
revision recorded, the tables and the JSON - is :mod:`benchmarks.harness`.

Nothing here imports kvpress_mm at import time: the kvpress side of ``kvpress_compare`` runs in
benchmarks/.kvpress-venv (NVIDIA kvpress, an older transformers, no kvpress_mm) and imports
this package and the harness.
"""
