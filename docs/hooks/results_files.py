"""mkdocs hook: publish benchmarks/results/*.json beside the pages, so every table's JSON link resolves on the
site (and `mkdocs build --strict` checks those links like any other)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files


def on_files(files: Files, config: Any) -> Files:
    root = Path(config["config_file_path"]).resolve().parent
    for path in sorted((root / "benchmarks" / "results").glob("*.json")):
        rel = path.relative_to(root).as_posix()
        files.append(File(rel, str(root), config["site_dir"], config["use_directory_urls"]))
    return files
