"""``python -m benchmarks.prefill_decode``: see :mod:`benchmarks.prefill_decode.cli`."""

from benchmarks.prefill_decode.cli import main

if __name__ == "__main__":
    main()
