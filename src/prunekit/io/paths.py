"""Where prunekit keeps its own files: the cache (`$PRUNEKIT_CACHE`) and one folder for scratch files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """prunekit's cache: converted built-in models, scores, prepared task data (`$PRUNEKIT_CACHE`, default
    ~/.cache/prunekit)."""
    root = os.environ.get("PRUNEKIT_CACHE") or os.path.join("~", ".cache", "prunekit")
    return Path(root).expanduser()


def temp_root() -> Path:
    """prunekit's one folder in the system's temporary directory (per user), for scratch folders."""
    return Path(tempfile.gettempdir()) / f"prunekit-{os.getuid()}"
