"""Files copied verbatim into exported checkpoints (they import only transformers)."""
