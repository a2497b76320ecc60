"""Structural surgery: remove sub-layers and whole layers, and derive the config from what is left. In place.

Removed sub-layers are replaced by parameter-free stand-ins (the same classes that travel inside
heterogeneous checkpoints), and layers that lose both sub-layers are taken out of the stack. The config is
then derived from what the modules actually are, so it can never disagree with the weights.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.hf_remote.modeling_prunekit import stock_class
from prunekit.io import config_edit
from prunekit.plans import DropTarget
from prunekit.surgery.widths import sync_attention_configs


def mark_drops(adapter: ModelAdapter, drops: Iterable[DropTarget]) -> None:
    """Replace dropped sub-layers by stand-ins, keeping layer indices (idempotent).

    The model still has all its layers afterwards, so later re-scoring and plans keep the original
    numbering; `compact` removes emptied layers at the end."""
    layers = adapter.layers()
    for d in drops:
        layer = layers[d.layer]
        if d.module in ("attn", "block"):
            adapter.remove_attention(layer, d.layer)
        if d.module in ("mlp", "block"):
            adapter.remove_mlp(layer)


def compact(adapter: ModelAdapter) -> list[int]:
    """Remove layers that have neither attention nor MLP; renumber the rest. Returns kept original indices."""
    layers = adapter.layers()
    keep = [i for i, layer in enumerate(layers) if adapter.has_attention(layer) or adapter.has_mlp(layer)]
    if len(keep) == len(layers):
        return keep
    new_layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(new_layers):
        # Attention modules (and some decoder layers) address the KV cache by `layer_idx`.
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    adapter.set_layers(new_layers)
    config_edit.keep_layers(adapter.config, keep)
    return keep


def refresh_config(adapter: ModelAdapter) -> dict[str, Any] | None:
    """Derive the config from the modules: uniform widths go into the stock fields; anything that
    differs between layers (removed sub-layers, per-layer widths) goes into `config.prunekit` with an
    `auto_map` to the checkpoint's own loader. Returns the heterogeneous structure or None."""
    cfg = adapter.config
    layers = adapter.layers()
    widths = [adapter.layer_widths(layer) for layer in layers]
    # Stock fields take the most common width so that the fewest layers need overrides.
    stock: dict[str, int] = {}
    for key in adapter.width_fields():
        values = [w[key] for w in widths if key in w]
        # Only values the config class accepts on reload (Llama/Gemma3 configs insist that hidden_size be a
        # multiple of num_attention_heads even with an explicit head_dim); with none, the field keeps its
        # current value and every layer gets an override.
        ok = [v for v in set(values) if _stock_value_ok(cfg, key, v)]
        if ok:
            stock[key] = max(ok, key=lambda v: (values.count(v), v))
    if stock.get("num_attention_heads", cfg.num_attention_heads) != cfg.num_attention_heads:
        config_edit.ensure_head_dim(cfg)
    dense = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    config_edit.set_uniform_width(cfg, **{k: v for k, v in stock.items() if k in dense})
    config_edit.set_expert_fields(cfg, {k: v for k, v in stock.items() if k not in dense})
    sync_attention_configs(adapter)
    overrides = {
        str(i): {k: v for k, v in w.items() if v != stock.get(k)}
        for i, w in enumerate(widths)
    }
    overrides = {k: v for k, v in overrides.items() if v}
    dropped_attn = [i for i, layer in enumerate(layers) if not adapter.has_attention(layer)]
    dropped_mlp = [i for i, layer in enumerate(layers) if not adapter.has_mlp(layer)]
    structure: dict[str, Any] | None = None
    if dropped_attn or dropped_mlp or overrides:
        if overrides:
            config_edit.ensure_head_dim(cfg)
        structure = {
            **adapter.structure_names(),
            "dropped_attn": dropped_attn,
            "dropped_mlp": dropped_mlp,
            "layer_overrides": overrides,
        }
    config_edit.set_structure(adapter.model.config, structure, stock_class(adapter.model).__name__)
    return structure


def _stock_value_ok(cfg: Any, key: str, value: int) -> bool:
    """Whether the config class's own architecture check accepts `key = value` (run on a shallow copy)."""
    validate = getattr(cfg, "validate_architecture", None)
    if validate is None:
        return True
    trial = copy.copy(cfg)
    setattr(trial, key, value)
    try:
        trial.validate_architecture()
    except ValueError:
        return False
    return True


def count_parameters(model: nn.Module) -> int:
    """Unique parameters: `parameters()` yields a tied embedding/LM-head weight once."""
    return sum(p.numel() for p in model.parameters())
