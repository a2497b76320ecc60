"""Reading a model's description without its weights: dtypes by name, built-in names to folders, the config as
every prunekit reader must get it (sealed heterogeneous configs unsealed, no remote code), and the meta-device
skeleton. Below `io.checkpoint` (loading and saving) and `io.model_card`, which both need it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedConfig

from prunekit.errors import CheckpointError, DtypeError
from prunekit.hf_remote import modeling_prunekit
from prunekit.io import config_edit
from prunekit.io.assets import BUILTIN_MODELS, builtin_model_dir

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise DtypeError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_model_path(spec: str | Path) -> str:
    """A built-in name becomes its cached directory; anything else is returned as given."""
    s = str(spec)
    if s in BUILTIN_MODELS and not Path(s).exists():
        return str(builtin_model_dir(s))
    return s


def load_config(spec: str | Path) -> Any:
    """The config of a checkpoint (local directory or hub id), as every prunekit reader must get it: a sealed
    heterogeneous config (model_type `prunekit_<stock>`) becomes the stock config class of its stock type with
    the `prunekit` structure kept, as `surgery.refresh_config` left it in memory, so no remote code runs and the
    adapters apply; any other goes through `AutoConfig` (a checkpoint of an older prunekit, with the stock
    model_type and the structure, included). Raises what transformers raises."""
    path = str(spec)
    config_dict, _ = PreTrainedConfig.get_config_dict(path)
    if not config_edit.is_sealed(config_dict):
        return AutoConfig.from_pretrained(path)
    stock = config_edit.unsealed_config(config_dict)
    if stock["model_type"] not in CONFIG_MAPPING:
        raise ValueError(f"the checkpoint's stock model_type {stock['model_type']!r} is unknown to this transformers")
    # from_dict, not the class's from_pretrained: the dict already carries the stock model_type, so no warning
    # about a mismatched one.
    return CONFIG_MAPPING[stock["model_type"]].from_dict(stock, name_or_path=path)


def model_class_for(config: Any) -> type:
    """The class that builds `config`: the stock transformers class, wrapped when the config describes a
    heterogeneous prunekit structure."""
    try:
        base = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError as e:
        raise CheckpointError(f"transformers has no causal-LM class for model_type {config.model_type!r}") from e
    if getattr(config, "prunekit", None):
        return modeling_prunekit.make_class(base)
    return base


def load_generation_config(path: Path) -> Any:
    """The generation config `from_pretrained` would attach (its file, or one derived from config.json), so
    that a streamed save writes the same generation_config.json as the in-memory path."""
    try:
        return GenerationConfig.from_pretrained(str(path))
    except OSError:
        return GenerationConfig.from_pretrained(str(path), config_file_name="config.json", _from_model_config=True)


def build_skeleton(path: str | Path, dtype: str | torch.dtype = "float32") -> nn.Module:
    """The model of a local checkpoint built on the meta device: every module and shape, no weight memory.
    The class is the one `load_model` uses (stock, or prunekit's heterogeneous wrapper)."""
    path = Path(path)
    try:
        config = load_config(path)
    except Exception as e:  # transformers raises OSError/ValueError: one message for all
        raise CheckpointError(f"cannot load a config from {path}: {e}") from e
    cls = model_class_for(config)
    with torch.device("meta"):
        model = cls._from_config(config, dtype=parse_dtype(dtype))
    if model.can_generate():
        model.generation_config = load_generation_config(path)
    return model.eval()
