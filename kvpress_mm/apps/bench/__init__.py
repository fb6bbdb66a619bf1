"""Benchmarks built on the public API: ``fidelity`` (against the full cache) and ``accuracy`` (reference VLM)."""
