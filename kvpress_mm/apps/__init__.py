"""Applications built on the library: the command line, demo, benchmarks, evaluations, the reference model."""
