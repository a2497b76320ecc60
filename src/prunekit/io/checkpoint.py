"""Loading models (built-in names, local checkpoints, hub ids) and saving pruned checkpoints atomically.

A saved checkpoint is physically smaller (removed weights are gone from the safetensors), carries its
tokenizer and `prunekit_plan.json`, and loads with plain transformers: a homogeneous result through its
stock config, a heterogeneous one through `modeling_prunekit.py` (copied in, imports only torch and
transformers) with `trust_remote_code=True`, or through `prunekit.load_model` without remote code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from prunekit.errors import CheckpointError, DtypeError
from prunekit.faults import pause_point
from prunekit.hf_remote import modeling_prunekit
from prunekit.io import config_edit
from prunekit.io.assets import BUILTIN_MODELS, builtin_model_dir
from prunekit.io.config_edit import REMOTE_MODULE
from prunekit.io.files import read_index
from prunekit.io.outputs import atomic_dir
from prunekit.plans import PLAN_FILE, PruningPlan

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


def _check_local_dir(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} has no config.json; not a Hugging Face checkpoint")
    try:
        json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg} is not valid JSON: {e}") from e
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise CheckpointError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
    read_index(path)  # a corrupt index or a missing shard is one clear error


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


def load_model(spec: str | Path, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) from a built-in name, a local checkpoint directory, or a hub id."""
    check_model_spec(spec, tokenizer=tokenizer)
    path = resolve_model_path(spec)
    local = Path(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises OSError/ValueError/hub errors: one message for all
        hint = "" if local.exists() else " (not a local directory, a built-in name " \
            f"({', '.join(BUILTIN_MODELS)}), or a reachable hub id)"
        raise CheckpointError(f"cannot load a config from {spec!r}{hint}: {e}") from e
    cls = model_class_for(config)
    try:
        model = cls.from_pretrained(path, config=config, dtype=parse_dtype(dtype))
    except Exception as e:
        raise CheckpointError(f"cannot load weights from {spec!r}: {e}") from e
    model.to(device).eval()
    return model, (load_tokenizer(path, spec) if tokenizer else None)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def check_model_spec(spec: str | Path, *, tokenizer: bool = True) -> None:
    """The checks a command runs on a model argument before loading anything: a built-in name is fine; a
    local directory must hold a config, weights (and a tokenizer, when one is needed); anything that is
    written like a path but does not exist is reported as such, not as an unreachable hub id."""
    s = str(spec)
    local = Path(s).expanduser()
    if s in BUILTIN_MODELS and not local.exists():
        return
    if local.exists():
        _check_local_dir(local)
        if tokenizer and not any((local / f).is_file() for f in _TOKENIZER_FILES):
            raise CheckpointError(f"{local} has no tokenizer ({', '.join(_TOKENIZER_FILES)}); save the "
                                  "tokenizer with the checkpoint (tokenizer.save_pretrained)")
        return
    if not _HUB_ID.match(s):
        raise CheckpointError(f"no such checkpoint directory: {s} (nor a built-in name: {', '.join(BUILTIN_MODELS)})")


def load_tokenizer(path: str | Path, spec: str | Path | None = None) -> Any:
    """The tokenizer saved with a checkpoint (one `CheckpointError` when it cannot be loaded)."""
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot load a tokenizer from {spec or path!r}: {e}") from e


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
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises OSError/ValueError: one message for all
        raise CheckpointError(f"cannot load a config from {path}: {e}") from e
    cls = model_class_for(config)
    with torch.device("meta"):
        model = cls._from_config(config, dtype=parse_dtype(dtype))
    if model.can_generate():
        model.generation_config = load_generation_config(path)
    return model.eval()


def remote_code_source(base_class_name: str) -> str:
    """modeling_prunekit.py as it travels in a checkpoint: the module's source plus the class that
    `auto_map` names."""
    src = Path(modeling_prunekit.__file__).read_text()
    return (
        src
        + "\n\n# The class named by config.auto_map for this checkpoint.\n"
        + "import transformers as _transformers  # noqa: E402\n\n"
        + f"Prunekit{base_class_name} = make_class(_transformers.{base_class_name})\n"
    )


def write_companions(folder: Path, tokenizer: Any, remote_base: str | None, plan: PruningPlan | None) -> None:
    """Everything a checkpoint carries beside its weights and config: the tokenizer, the remote-code loader
    (heterogeneous checkpoints: `remote_base` names the stock class) and the plan."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if remote_base:
        (folder / f"{REMOTE_MODULE}.py").write_text(remote_code_source(remote_base))
    if plan is not None:
        plan.save(folder / PLAN_FILE)


def save_checkpoint(model: nn.Module, tokenizer: Any, out: str | Path, plan: PruningPlan | None = None, *,
                    force: bool = False, extras: Callable[[Path], None] | None = None) -> Path:
    """Write model + tokenizer + plan (+ what `extras(folder)` writes) to `out`, all or nothing (temporary
    directory, then rename)."""
    config_edit.drop_foreign_auto_map(model.config)
    with atomic_dir(out, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        heterogeneous = bool(getattr(model.config, "prunekit", None))
        write_companions(tmp, tokenizer, modeling_prunekit.stock_class(model).__name__ if heterogeneous else None,
                         plan)
        if extras is not None:
            extras(tmp)
        pause_point("saving")
    return Path(out)
