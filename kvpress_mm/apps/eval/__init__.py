"""Quality evaluations behind ``kvpress-mm eval``: benchmarks run with a compressed KV cache."""
