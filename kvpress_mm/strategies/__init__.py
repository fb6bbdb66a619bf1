"""Built-in strategies, one per file. Each registers itself through the plugin hook."""
