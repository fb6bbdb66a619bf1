"""The transformers cache side: growing cache layers and applying plans to cache layers."""
