"""``python -m benchmarks.decode``: see :mod:`benchmarks.decode.cli`."""

from benchmarks.decode.cli import main

if __name__ == "__main__":
    main()
