"""Loading models (built-in names, local checkpoints, hub ids) and saving pruned checkpoints atomically.

A saved checkpoint is physically smaller (removed weights are gone from the safetensors), carries its
tokenizer, `prunekit_plan.json` and a model card (`README.md`, `io.model_card`), and loads with plain transformers: a homogeneous result through its
stock config, a heterogeneous one through `modeling_prunekit.py` (copied in, imports only torch and
transformers) with `trust_remote_code=True`, or through `prunekit.load_model` without remote code. A
heterogeneous config.json is sealed (`config_edit.sealed_config`: model_type `prunekit_<stock>`), so plain
transformers refuses it without `trust_remote_code` instead of building the stock model; `load_config` reads
it back as the stock config class, structure kept.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
)

from prunekit.errors import CheckpointError
from prunekit.faults import pause_point
from prunekit.hf_remote import modeling_prunekit
from prunekit.io import config_edit
from prunekit.io.assets import BUILTIN_MODELS
from prunekit.io.config_edit import REMOTE_MODULE, RemoteClasses
from prunekit.io.files import read_index
from prunekit.io.model_card import write_model_card
from prunekit.io.outputs import Target, atomic_dir, input_paths
from prunekit.io.skeleton import (  # noqa: F401  (part of this module's API: loading)
    build_skeleton,
    load_config,
    load_generation_config,
    model_class_for,
    parse_dtype,
    resolve_model_path,
)
from prunekit.plans import PLAN_FILE, PruningPlan


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


def load_model(spec: str | Path, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) from a built-in name, a local checkpoint directory, or a hub id."""
    check_model_spec(spec, tokenizer=tokenizer)
    path = resolve_model_path(spec)
    local = Path(path)
    try:
        config = load_config(path)
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
    _check_hub_id(s)


def _check_hub_id(repo: str) -> None:
    """A hub id that is neither in the local Hugging Face cache nor reachable is one clear error now, not a
    minute of download retries and warnings."""
    from huggingface_hub import constants, get_session, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo, "config.json"), str):
            return
    except ValueError:  # not a valid repo id: let the hub lookup below say so
        pass
    what = (f"{repo!r} is not a local checkpoint directory, a built-in name ({', '.join(BUILTIN_MODELS)}), or a "
            "hub id in the local Hugging Face cache")
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{what} (HF_HUB_OFFLINE is set, so the hub is not asked)")
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as e:  # DNS, refused connection, proxy, timeout: all mean the same here
        raise CheckpointError(f"{what}, and the hub ({constants.ENDPOINT}) cannot be reached to look for it "
                              f"({type(e).__name__})") from e


def load_tokenizer(path: str | Path, spec: str | Path | None = None) -> Any:
    """The tokenizer saved with a checkpoint (one `CheckpointError` when it cannot be loaded)."""
    # AutoTokenizer picks the class from the model config; left to read a sealed one itself, it would first ask
    # on stdin whether to run the checkpoint's code (and the question would land in the command's output), then
    # decide by the unknown model_type. Given the stock config, it decides as for the stock model.
    try:
        config = load_config(path)
    except Exception:  # a folder holding only a tokenizer: AutoTokenizer manages without a model config
        config = None
    try:
        return AutoTokenizer.from_pretrained(str(path), config=config)
    except Exception as e:
        raise CheckpointError(f"cannot load a tokenizer from {spec or path!r}: {e}") from e


def remote_code_source(remote: RemoteClasses) -> str:
    """modeling_prunekit.py as it travels in a checkpoint: the module's source plus the classes that
    `auto_map` names."""
    src = Path(modeling_prunekit.__file__).read_text()
    config_cls, model_cls = f"Prunekit{remote.config_class}", f"Prunekit{remote.model_class}"
    return (
        src
        + "\n\n# The classes named by config.auto_map for this checkpoint.\n"
        + "import transformers as _transformers  # noqa: E402\n\n"
        + f"{config_cls} = make_config_class(_transformers.{remote.config_class}, {remote.model_type!r})\n"
        + f"{model_cls} = make_class(_transformers.{remote.model_class}, {config_cls})\n"
    )


def write_companions(folder: Path, tokenizer: Any, remote: RemoteClasses | None, plan: PruningPlan | None, *,
                     source: str | Path | None = None) -> None:
    """Everything a checkpoint carries beside its weights and config: the tokenizer, the remote-code loader
    (heterogeneous checkpoints: `remote`, as `config_edit.seal_config_file` returned it), the plan, and with a plan
    the model card (`io.model_card`; `source`: the folder the model was loaded from, its base when the plan does
    not name one). Called by every checkpoint writer, inside its temporary folder."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if remote is not None:
        (folder / f"{REMOTE_MODULE}.py").write_text(remote_code_source(remote))
    if plan is not None:
        plan.save(folder / PLAN_FILE)
        write_model_card(folder, plan, source)


def save_checkpoint(model: nn.Module, tokenizer: Any, out: str | Path | Target, plan: PruningPlan | None = None,
                    *, force: bool = False, extras: Callable[[Path], None] | None = None) -> Path:
    """Write model + tokenizer + plan (+ what `extras(folder)` writes) to `out`, all or nothing (temporary
    directory, then rename). Never into, over or around the folder the model was loaded from."""
    config_edit.drop_foreign_auto_map(model.config)
    loaded_from = input_paths(getattr(model, "name_or_path", None) or None)
    with atomic_dir(out, force, inputs=loaded_from) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_companions(tmp, tokenizer, config_edit.seal_config_file(tmp / "config.json"), plan,
                         source=getattr(model, "name_or_path", None) or None)
        if extras is not None:
            extras(tmp)
        pause_point("saving")
    return Path(out)
