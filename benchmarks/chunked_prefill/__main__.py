"""``python -m benchmarks.chunked_prefill``: see :mod:`benchmarks.chunked_prefill.cli`."""

from benchmarks.chunked_prefill.cli import main

if __name__ == "__main__":
    main()
