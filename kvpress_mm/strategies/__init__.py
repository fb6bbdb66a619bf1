"""Built-in strategies, one per file. Each registers itself through the plugin hook."""

#: Names of the built-in strategies, in the order commands and benchmarks report them
#: (``full``, the no-op reference, first). ``vl-cache`` gives layers different budgets (same
#: total); every other one keeps ``n_keep`` per layer and KV head. The wrappers, which take an
#: inner strategy, are listed in :data:`kvpress_mm.wrappers.BUILTIN_WRAPPERS`.
BUILTIN_STRATEGIES: tuple[str, ...] = (
    "full",
    "random",
    "streaming",
    "h2o",
    "snapkv",
    "lookm-evict",
    "lookm-average",
    "lookm-pivotal",
    "lookm-weighted",
    "tova",
    "knorm",
    "vl-cache",
)

#: The built-in strategies whose layers keep different budgets (the total over layers is exact).
LAYER_ADAPTIVE_STRATEGIES: tuple[str, ...] = ("vl-cache",)
