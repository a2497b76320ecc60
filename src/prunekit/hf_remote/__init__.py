"""Code that travels inside heterogeneous checkpoints (see `modeling_prunekit.py`)."""
