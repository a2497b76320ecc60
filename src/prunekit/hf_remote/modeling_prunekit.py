"""Loader for prunekit's heterogeneous checkpoints. Imports only torch and transformers.

This file is copied verbatim into every checkpoint whose layers differ from one another (attention or MLP
removed in some layers only, or per-layer widths), so that plain transformers loads it with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` in an environment without prunekit.
It forks no Hugging Face modeling code: the stock architecture is built from the stock config, and then the
sub-layers named in `config.prunekit` are replaced (removed ones by parameter-free stand-ins, narrowed ones
by stock modules built from a per-layer copy of the config).

Such a checkpoint's `model_type` is prunekit's own (`prunekit_<stock model_type>`), and `auto_map` names a
config class defined here (the stock config class under that model_type) beside the model class: a stock
model_type would let transformers build the stock model without this file, silently wrong; an unknown one
makes it refuse unless `trust_remote_code=True`.

`config.prunekit` holds:
    layers_path, attn, mlp, attn_norms, mlp_norms : module names (written by prunekit's adapter)
    mlp_fields (optional)                         : config fields an MLP is rebuilt for (default intermediate_size)
    mlp_output (optional)                         : "tuple" where the MLP returns (output, router scores)
    dropped_attn, dropped_mlp                     : layer indices whose sub-layer is gone
    layer_overrides                               : {"<layer>": {config field: value}} for narrowed layers
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

try:  # transformers >= 5: a cache layer that stores nothing (used for layers without attention)
    from transformers.cache_utils import DummyLayer as _NoKVLayer
except ImportError:  # pragma: no cover - older transformers
    _NoKVLayer = None


class DroppedAttention(nn.Module):
    """Stands in for a removed attention sub-layer: contributes nothing to the residual stream and
    stores nothing in the KV cache.

    Its cache slot becomes a `DummyLayer`, which transformers' cache skips when it asks for the sequence
    length or mask sizes (it asks layer 0 by default, and layer 0 may be one of ours)."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: Any, past_key_values: Any = None, **kwargs: Any):
        if past_key_values is not None:
            _mark_no_kv(past_key_values, self.layer_idx)
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


class DroppedMLP(nn.Module):
    """Stands in for a removed MLP sub-layer: contributes nothing to the residual stream. `returns_tuple`: the
    family's MLP returns (output, router scores) and its decoder layer unpacks them (gpt-oss)."""

    def __init__(self, returns_tuple: bool = False):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = torch.zeros_like(hidden_states)
        return (out, None) if self.returns_tuple else out


class PassThrough(nn.Module):
    """Stands in for a norm that only served a removed sub-layer (its weights are gone too)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def _mark_no_kv(cache: Any, layer_idx: int) -> None:
    layers = getattr(cache, "layers", None)
    if layers is None or _NoKVLayer is None:
        return
    # A cache built without a config grows its layer list on demand; make sure our slot exists.
    replicate = getattr(cache, "layer_class_to_replicate", None)
    if replicate is not None:
        while len(layers) <= layer_idx:
            layers.append(replicate())
    if layer_idx < len(layers) and not isinstance(layers[layer_idx], _NoKVLayer):
        layers[layer_idx] = _NoKVLayer()


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def drop_attention(layer: nn.Module, layer_idx: int, names: dict[str, Any]) -> None:
    setattr(layer, names["attn"], DroppedAttention(layer_idx))
    for norm in names["attn_norms"]:
        setattr(layer, norm, PassThrough())


def drop_mlp(layer: nn.Module, names: dict[str, Any]) -> None:
    setattr(layer, names["mlp"], DroppedMLP(names.get("mlp_output") == "tuple"))
    for norm in names["mlp_norms"]:
        setattr(layer, norm, PassThrough())


def layer_config(config: Any, overrides: dict[str, Any]) -> Any:
    """A copy of the (text) config with one layer's widths; stock modules are built from it."""
    cfg = copy.copy(_text_config(config))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def rebuild_narrowed(layer: nn.Module, layer_idx: int, config: Any, overrides: dict[str, Any],
                     names: dict[str, Any]) -> None:
    """Replace a layer's attention and/or MLP by stock modules built at the narrowed width."""
    cfg = layer_config(config, overrides)
    attn = getattr(layer, names["attn"])
    if not isinstance(attn, DroppedAttention) and (
        "num_attention_heads" in overrides or "num_key_value_heads" in overrides
    ):
        new_attn = type(attn)(cfg, layer_idx)
        setattr(layer, names["attn"], new_attn.to(dtype=_dtype_of(attn)))
    mlp = getattr(layer, names["mlp"])
    # Mixture-of-Experts adapters name the fields their MLP is built from (expert count and widths).
    mlp_fields = names.get("mlp_fields", ["intermediate_size"])
    if not isinstance(mlp, DroppedMLP) and any(k in overrides for k in mlp_fields):
        new_mlp = type(mlp)(cfg)
        setattr(layer, names["mlp"], new_mlp.to(dtype=_dtype_of(mlp)))


def _dtype_of(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.get_default_dtype()


def apply_structure(model: nn.Module, config: Any) -> None:
    """Turn a freshly built stock model into the heterogeneous structure that `config.prunekit` describes."""
    spec = getattr(config, "prunekit", None) or {}
    if not spec:
        return
    layers = _get(model, spec["layers_path"])
    for key, overrides in (spec.get("layer_overrides") or {}).items():
        idx = int(key)
        rebuild_narrowed(layers[idx], idx, config, overrides, spec)
    for idx in spec.get("dropped_attn", []):
        drop_attention(layers[int(idx)], int(idx), spec)
    for idx in spec.get("dropped_mlp", []):
        drop_mlp(layers[int(idx)], spec)


class PrunekitMixin:
    """Builds the stock model, then applies `config.prunekit`. Put before the stock class in the bases."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        apply_structure(self, config)  # type: ignore[arg-type]


def make_config_class(base: type, model_type: str) -> type:
    """The stock config class `base` under prunekit's own `model_type` (what a checkpoint's config.json says)."""
    return type(f"Prunekit{base.__name__}", (base,), {"model_type": model_type, "__module__": __name__})


def make_class(base: type, config_class: type | None = None) -> type:
    """The heterogeneous counterpart of a stock `*ForCausalLM` class. `config_class`: the config class it is
    registered with in transformers' auto classes, which insist that it be the model class's own."""
    attrs: dict[str, Any] = {"__module__": __name__}
    if config_class is not None:
        attrs["config_class"] = config_class
    cls = type(f"Prunekit{base.__name__}", (PrunekitMixin, base), attrs)
    _share_weight_conversions(cls.__name__, base)
    return cls


def _share_weight_conversions(class_name: str, base: type) -> None:
    """Give the class the stock class's checkpoint conversions. transformers saves some families' weights in
    another layout than its modules hold (Mixture-of-Experts: one tensor per expert in the files, fused 3D
    tensors in the model) and converts them on load by model_type, but never for a class from remote code
    unless it is registered by name."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # pragma: no cover - transformers without conversions (4.x) stores the modules' layout
        return
    model_type = getattr(getattr(base, "config_class", None), "model_type", None)
    mapping = get_checkpoint_conversion_mapping(model_type) if model_type else None
    if mapping:
        register_checkpoint_conversion_mapping(class_name, mapping, overwrite=True)


def stock_class(model: nn.Module) -> type:
    """The transformers class a (possibly prunekit-wrapped) model is built on."""
    cls = type(model)
    if issubclass(cls, PrunekitMixin):
        return next(b for b in cls.__mro__[1:] if not issubclass(b, PrunekitMixin) and b is not PrunekitMixin)
    return cls
