"""The only module that edits a Hugging Face config. Every field a surgery touches is changed here."""

from __future__ import annotations

from typing import Any, Sequence

REMOTE_MODULE = "modeling_prunekit"


def per_layer_fields(config: Any) -> list[str]:
    """Config fields holding one entry per decoder layer (e.g. `layer_types`): sliced when layers go."""
    n = int(config.num_hidden_layers)
    return [k for k, v in vars(config).items() if isinstance(v, list) and len(v) == n and not k.startswith("_")]


def keep_layers(config: Any, keep: Sequence[int]) -> None:
    """Shrink the config to the decoder layers `keep` (original indices, ascending)."""
    keep = list(keep)
    for name in per_layer_fields(config):
        values = getattr(config, name)
        setattr(config, name, [values[i] for i in keep])
    config.num_hidden_layers = len(keep)


def set_uniform_width(config: Any, *, num_attention_heads: int | None = None,
                      num_key_value_heads: int | None = None, intermediate_size: int | None = None) -> None:
    """Stock fields for a model whose layers all have the same (narrowed) widths. `head_dim` is written
    explicitly because stock code derives it as hidden_size // num_attention_heads otherwise."""
    if num_attention_heads is not None:
        if getattr(config, "head_dim", None) in (None, 0):
            config.head_dim = config.hidden_size // config.num_attention_heads
        config.num_attention_heads = int(num_attention_heads)
    if num_key_value_heads is not None:
        config.num_key_value_heads = int(num_key_value_heads)
    if intermediate_size is not None:
        config.intermediate_size = int(intermediate_size)


def ensure_head_dim(config: Any) -> None:
    if getattr(config, "head_dim", None) in (None, 0):
        config.head_dim = config.hidden_size // config.num_attention_heads


def set_structure(config: Any, structure: dict[str, Any] | None, base_class_name: str | None) -> None:
    """Record (or clear) a heterogeneous structure and point `auto_map` at the checkpoint's own loader.

    A homogeneous result gets neither field, so its config stays stock and loads without remote code; that
    includes a model that was heterogeneous earlier (a per-layer width plan whose intermediate shots differed
    between layers and whose last shot rounds every layer to the same multiple)."""
    if structure:
        config.prunekit = structure
        config.auto_map = {"AutoModelForCausalLM": f"{REMOTE_MODULE}.Prunekit{base_class_name}"}
        return
    if hasattr(config, "prunekit"):
        del config.prunekit
    if hasattr(config, "auto_map"):  # prunekit's own loader from an earlier state, or a source model's
        del config.auto_map


def drop_foreign_auto_map(config: Any) -> None:
    """Remove `auto_map` entries other than prunekit's own loader. A source model that ships remote code
    names its .py files there, but prunekit builds every supported architecture from transformers' own
    classes and does not copy those files, so a saved checkpoint that kept the entries would not load."""
    auto_map = dict(getattr(config, "auto_map", None) or {})
    ours = {k: v for k, v in auto_map.items() if str(v).startswith(REMOTE_MODULE + ".")}
    if ours:
        config.auto_map = ours
    elif hasattr(config, "auto_map"):
        del config.auto_map


def drop_quantization(config: Any) -> None:
    """A GGUF-loaded model carries a quantization_config that `save_pretrained` refuses; the weights are
    already dequantized, so the field is stale."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
