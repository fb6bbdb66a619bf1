"""Wrapper strategies: strategies that take an inner strategy and change its budgets or scores.

One wrapper per file, registered through ``kvpress_mm_register_strategies`` like any strategy
(the registry finds every module of this package that implements a hook); ``base.py`` holds the
base class :class:`~kvpress_mm.wrappers.base.Wrapper`. A wrapper sees what a strategy sees
(:mod:`kvpress_mm.ops`) and its inner strategy; it imports nothing from the session, the
adapters or ``transformers``.
"""

#: Names of the built-in wrappers, in the order commands and benchmarks report them. Each takes
#: an inner strategy (``inner=``, default ``snapkv``); they are not in
#: :data:`~kvpress_mm.strategies.BUILTIN_STRATEGIES`, whose members compress on their own.
BUILTIN_WRAPPERS: tuple[str, ...] = ("pyramid", "modality-budget", "mixkv", "adakv", "decoding", "chunked-prefill")
