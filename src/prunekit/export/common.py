"""What every export format needs: the error type, the source model read once into plain per-layer facts,
and an all-or-nothing file commit.

The per-layer facts (`LayerShape`) are read from the modules through the adapter, the same way
`surgery.refresh_config` derives a config, so an exporter can never disagree with the weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from prunekit.errors import PrunekitError


class ExportError(PrunekitError):
    """A checkpoint cannot be written in the asked format (structure the format cannot express, missing
    binding for a quantization type, an existing output without force)."""


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer as an inference engine sees it; 0 means the sub-layer is gone."""

    n_head: int
    n_head_kv: int
    n_ff: int

    @property
    def has_attn(self) -> bool:
        return self.n_head > 0

    @property
    def has_mlp(self) -> bool:
        return self.n_ff > 0


@dataclass
class ExportSource:
    """A loaded prunekit checkpoint with the facts exporters need."""

    model: nn.Module
    tokenizer: Any
    adapter: Any  # prunekit.adapters.ModelAdapter
    shapes: list[LayerShape]

    @property
    def config(self) -> Any:
        return self.adapter.config

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

    @property
    def heterogeneous(self) -> bool:
        """Layers differ from one another (a sub-layer missing somewhere, or per-layer widths)."""
        return len(set(self.shapes)) > 1 or any(not s.has_attn or not s.has_mlp for s in self.shapes)

    @property
    def head_dim(self) -> int:
        return int(self.adapter.head_dim)

    @property
    def tied(self) -> bool:
        return self.adapter.lm_head().weight.data_ptr() == self.adapter.embed().weight.data_ptr()


def layer_shapes(adapter: Any) -> list[LayerShape]:
    from prunekit.surgery import layer_widths

    out = []
    for layer in adapter.layers():
        w = layer_widths(adapter, layer)
        out.append(LayerShape(w.get("num_attention_heads", 0), w.get("num_key_value_heads", 0),
                              w.get("intermediate_size", 0)))
    return out


def load_source(src: str | Path) -> ExportSource:
    """Load a checkpoint (built-in name, directory or hub id) in float32 for export."""
    from prunekit.adapters import get_adapter
    from prunekit.checkpoint import load_model

    model, tok = load_model(src, dtype="float32")
    adapter = get_adapter(model)
    return ExportSource(model, tok, adapter, layer_shapes(adapter))


def to_numpy(t: torch.Tensor, dtype: Any) -> Any:
    return t.detach().to(torch.float32).cpu().numpy().astype(dtype, copy=False)


def check_output_file(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force (force=True) to replace it")
    if out.is_dir():
        raise ExportError(f"{out} is a directory; this format writes one file, give its name")
    out.parent.mkdir(parents=True, exist_ok=True)


@contextmanager
def atomic_file(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside `out`; rename it onto `out` only when the body finished, so a crash or an
    error never leaves a half-written file under the final name."""
    check_output_file(out, force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """The directory counterpart of `atomic_file` (reuses the checkpoint module's commit step)."""
    from prunekit.checkpoint import commit_dir, prepare_output_dir
    from prunekit.errors import CheckpointError

    try:
        prepare_output_dir(out, force)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        commit_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
