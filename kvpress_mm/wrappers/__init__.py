"""Wrapper strategies: strategies that take an inner strategy and change its budgets or timing.

One wrapper per file, registered through ``kvpress_mm_register_strategies`` like any strategy
(the registry finds every module of this package that implements a hook). A wrapper sees what a
strategy sees (:mod:`kvpress_mm.ops`) and its inner strategy; it imports nothing from the
session, the adapters or ``transformers``.
"""
