"""Built-in strategies, one per file. Each registers itself through the plugin hook."""

#: Names of the built-in strategies, in the order commands and benchmarks report them
#: (``full``, the no-op reference, first).
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
)
