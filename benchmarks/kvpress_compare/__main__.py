"""``python -m benchmarks.kvpress_compare``: see :mod:`benchmarks.kvpress_compare.cli`."""

from benchmarks.kvpress_compare.cli import main

if __name__ == "__main__":
    main()
