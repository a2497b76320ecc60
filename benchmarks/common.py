"""What the benchmark scripts share: their usual arguments, a record of the machine, the JSON write, and
perplexity on held-out wiki windows.

Scripts run as `.venv/bin/python benchmarks/bench_x.py` have this folder first on `sys.path`, so they import
it as `common`.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from prunekit.data import eval_windows
from prunekit.evaluation.perplexity import perplexity
from prunekit.io.outputs import write_json

DEFAULT_MODEL = "smollm2-135m"


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help shows the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model(p: argparse.ArgumentParser, default: str = DEFAULT_MODEL, help: str | None = None) -> None:
    p.add_argument("--model", default=default, help=help)


def add_samples(p: argparse.ArgumentParser, default: int = 16, help: str | None = None) -> None:
    p.add_argument("--samples", type=int, default=default, help=help)


def add_json(p: argparse.ArgumentParser, default: str, help: str | None = None) -> None:
    """`--json PATH`: where the results go (replaced if it exists; the results folder keeps the last run)."""
    p.add_argument("--json", default=default, help=help)


def machine_info(keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The machine and versions a result was measured with; `keys` picks and orders a subset (a script whose
    results already name some of these keeps exactly those)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    return info if keys is None else {k: info[k] for k in keys}


def write_results(data: Any, path: str | Path) -> Path:
    """Write the results JSON all or nothing (a run killed mid-write leaves the previous file), replacing it."""
    return write_json(data, path, force=True)


def heldout_windows(tokenizer: Any, windows: int, window_len: int, text: str = "wiki") -> torch.Tensor:
    """`windows` x `window_len` consecutive tokens from the evaluation half of `text` (never calibration data)."""
    return eval_windows(tokenizer, text, windows, window_len)


def heldout_perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """Perplexity of `model` over `windows` (`prunekit.evaluation.perplexity`, no progress bar)."""
    return float(perplexity(model, windows, progress=False)["perplexity"])
