"""The only module that edits a Hugging Face config. Every field a surgery touches is changed here."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

REMOTE_MODULE = "modeling_prunekit"
# A heterogeneous checkpoint's model_type is this prefix + the stock one: transformers does not know it, so it
# refuses the checkpoint rather than build the stock model without the structure (see `sealed_config`).
MODEL_TYPE_PREFIX = "prunekit_"
_CLASS_PREFIX = f"{REMOTE_MODULE}.Prunekit"


def per_layer_fields(config: Any) -> list[str]:
    """Config fields holding one entry per decoder layer (e.g. `layer_types`): sliced when layers go."""
    n = int(config.num_hidden_layers)
    return [k for k, v in vars(config).items() if isinstance(v, list) and len(v) == n and not k.startswith("_")]


def keep_layers(config: Any, keep: Sequence[int]) -> None:
    """Shrink the config to the decoder layers `keep` (original indices, ascending)."""
    keep = list(keep)
    names = [f for f in per_layer_fields(config) if f != "mlp_only_layers"]  # layer indices, not per layer
    _keep_dense_layers(config, keep)
    for name in names:
        values = getattr(config, name)
        setattr(config, name, [values[i] for i in keep])
    config.num_hidden_layers = len(keep)


def _keep_dense_layers(config: Any, keep: Sequence[int]) -> None:
    """Qwen MoE configs say which layers have a dense MLP by index (`mlp_only_layers`, `decoder_sparse_step`):
    renumber them for the layers kept, listing every dense one (and a step of 1, which then means none)."""
    only = getattr(config, "mlp_only_layers", None)
    step = getattr(config, "decoder_sparse_step", None)
    if only is None or not isinstance(step, int):
        return
    n_experts = getattr(config, "num_experts", 0) or 0
    dense = {i for i in range(int(config.num_hidden_layers))
             if i in only or not (n_experts > 0 and (i + 1) % step == 0)}
    config.mlp_only_layers = [new for new, old in enumerate(keep) if old in dense]
    config.decoder_sparse_step = 1


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


def set_expert_fields(config: Any, fields: dict[str, int]) -> None:
    """Stock Mixture-of-Experts fields of a model whose MoE layers all agree: the expert count, each
    expert's width, top-k and the shared expert's width, by the family's field names (`adapters.moe`)."""
    for key, value in fields.items():
        setattr(config, key, int(value))


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


@dataclass(frozen=True)
class RemoteClasses:
    """What a sealed checkpoint's modeling_prunekit.py defines: prunekit's subclasses of these stock classes."""

    model_class: str  # e.g. "LlamaForCausalLM"
    config_class: str  # e.g. "LlamaConfig"
    model_type: str  # the config class's model_type, e.g. "prunekit_llama"


def is_sealed(cfg: dict[str, Any]) -> bool:
    """Whether a config.json dict is a heterogeneous checkpoint's in prunekit's own model_type."""
    structure = cfg.get("prunekit")
    return (str(cfg.get("model_type", "")).startswith(MODEL_TYPE_PREFIX) and isinstance(structure, dict)
            and "base_model_type" in structure)


def sealed_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json's content as a checkpoint stores it (`cfg`: as `save_pretrained` wrote the in-memory config).

    Heterogeneous (a `prunekit` structure): model_type becomes `prunekit_<stock>` (the stock one kept as
    `prunekit.base_model_type`), and `auto_map` names both classes of modeling_prunekit.py (transformers needs
    the config class from there, as it does not know the model_type); `architectures` names the class that
    builds the checkpoint. Homogeneous: the stock config, with a stock class in `architectures` even when the
    model was loaded as prunekit's class. Idempotent."""
    out = copy.deepcopy(cfg)
    structure = out.get("prunekit")
    if not structure:
        if out.get("architectures"):
            out["architectures"] = [a.removeprefix("Prunekit") for a in out["architectures"]]
        return out
    base = structure.get("base_model_type") or out["model_type"]
    model_ref = (out.get("auto_map") or {}).get("AutoModelForCausalLM", "")
    if not model_ref.startswith(_CLASS_PREFIX) or base.startswith(MODEL_TYPE_PREFIX) or base not in CONFIG_MAPPING:
        raise ValueError(f"a heterogeneous config needs a stock model_type and prunekit's loader in auto_map; got "
                         f"model_type {base!r}, auto_map {out.get('auto_map')!r}")
    out["prunekit"] = {**structure, "base_model_type": base}
    out["model_type"] = MODEL_TYPE_PREFIX + base
    out["auto_map"] = {"AutoConfig": f"{_CLASS_PREFIX}{CONFIG_MAPPING[base].__name__}",
                       "AutoModelForCausalLM": model_ref}
    out["architectures"] = [model_ref.removeprefix(REMOTE_MODULE + ".")]
    return out


def unsealed_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A sealed config.json dict as prunekit holds it in memory: the stock model_type (so the stock config class
    and prunekit's adapters apply), the structure as `surgery.refresh_config` writes it, and `auto_map`
    naming only the model class. Other dicts are returned unchanged (copied)."""
    out = copy.deepcopy(cfg)
    if not is_sealed(out):
        return out
    out["model_type"] = out["prunekit"].pop("base_model_type")
    out["auto_map"] = {k: v for k, v in out["auto_map"].items() if k != "AutoConfig"}
    return out


def remote_classes(cfg: dict[str, Any]) -> RemoteClasses | None:
    """The classes a sealed config.json dict's `auto_map` names (None for a stock config)."""
    if not is_sealed(cfg):
        return None
    auto_map = cfg["auto_map"]
    return RemoteClasses(model_class=auto_map["AutoModelForCausalLM"].removeprefix(_CLASS_PREFIX),
                         config_class=auto_map["AutoConfig"].removeprefix(_CLASS_PREFIX),
                         model_type=cfg["model_type"])


def seal_config_file(path: Path) -> RemoteClasses | None:
    """Rewrite a config.json that `save_pretrained` wrote into its sealed form (`sealed_config`), formatted as
    transformers writes it. Returns the classes the checkpoint's modeling_prunekit.py must define, or None."""
    cfg = json.loads(path.read_text())
    sealed = sealed_config(cfg)
    if sealed != cfg:
        path.write_text(json.dumps(sealed, indent=2, sort_keys=True) + "\n")
    return remote_classes(sealed)


def drop_quantization(config: Any) -> None:
    """A GGUF-loaded model carries a quantization_config that `save_pretrained` refuses; the weights are
    already dequantized, so the field is stale."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
