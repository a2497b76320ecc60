"""What every export format needs: the source model read once into plain per-layer facts.

The per-layer facts (`LayerShape`) are read from the modules through the adapter, the same way
`surgery.refresh_config` derives a config, so an exporter can never disagree with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.adapters import ModelAdapter, get_adapter
from prunekit.errors import ExportError
from prunekit.io.checkpoint import load_model

__all__ = ["ExportError", "ExportSource", "LayerShape", "layer_shapes", "load_source", "to_numpy"]


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
    adapter: ModelAdapter
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


def layer_shapes(adapter: ModelAdapter) -> list[LayerShape]:
    out = []
    for layer in adapter.layers():
        w = adapter.layer_widths(layer)
        # mlp_width: a Mixture-of-Experts layer's expert width, under its family's config field
        out.append(LayerShape(w.get("num_attention_heads", 0), w.get("num_key_value_heads", 0),
                              adapter.mlp_width(layer) if adapter.has_mlp(layer) else 0))
    return out


def load_source(src: str | Path) -> ExportSource:
    """Load a checkpoint (built-in name, directory or hub id) in float32 for export."""
    model, tok = load_model(src, dtype="float32")
    adapter = get_adapter(model)
    return ExportSource(model, tok, adapter, layer_shapes(adapter))


def to_numpy(t: torch.Tensor, dtype: Any) -> Any:
    return t.detach().to(torch.float32).cpu().numpy().astype(dtype, copy=False)


def refuse_heterogeneous(src: ExportSource, name: str, arch: str, deci_lacks: str) -> None:
    """One clear error for a result with per-layer shapes (or removed sub-layers) of a family whose llama.cpp
    graph takes one shape for all layers, saying what the per-layer `deci` graph lacks for it."""
    if src.heterogeneous:
        raise ExportError(f"a heterogeneous {name} result cannot be written as GGUF: llama.cpp's {arch} graph takes "
                          f"one head count and MLP width for all layers, and its per-layer `deci` graph {deci_lacks}; "
                          "export a uniform result or use the Hugging Face checkpoint")


def has_biases(src: ExportSource, parts: tuple[str, ...] = ("attn", "mlp")) -> bool:
    """Whether any projection of the present sub-layers of kinds `parts` has a bias (fused ones included)."""
    a = src.adapter
    present = [(layer, part) for layer in a.layers() for part in parts
               if (a.has_attention(layer) if part == "attn" else a.has_mlp(layer))]
    return any(lin.bias is not None for layer, part in present for lin in a.projections(layer, part))
