"""``python -m benchmarks.quantized``: see :mod:`benchmarks.quantized.cli`."""

from benchmarks.quantized.cli import main

if __name__ == "__main__":
    main()
