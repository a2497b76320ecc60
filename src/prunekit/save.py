"""One way to save a pruned model: `save(model_or_source, tokenizer, out, plan)`.

A model in memory (or its `ResidentLayers`) is saved with `save_pretrained` (`io.checkpoint.save_checkpoint`).
A layer-streamed model (`StreamedLayers`) never holds its weights, so its pruned checkpoint is written
tensor by tensor from the source files: the plan is applied to a fresh meta skeleton with the ordinary
`surgery.apply_plan` (so the config and the tensor names are exactly the in-memory result's), and the values
of each kept layer come from materialising that one source layer and running the same surgery on it. Names
and values are converted as `save_pretrained` converts them (`io.stored.saved_tensors`: a fused MoE expert
tensor becomes one tensor per expert). Each tensor goes straight into its shard (`io.files.SafetensorsWriter`:
the header first, from the skeleton's names, dtypes and shapes), so memory holds one layer, never a whole
shard. The result equals, tensor for
tensor and in config.json, `load_model` + `apply_plan` + `save_checkpoint` (tests).

Both write to a temporary directory beside `out` and rename it into place when complete.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from prunekit._callable import call_as
from prunekit.engine.sources import LayerSource, ResidentLayers
from prunekit.engine.streamed import StreamedLayers
from prunekit.errors import CheckpointError
from prunekit.faults import pause_point
from prunekit.io import config_edit
from prunekit.io.checkpoint import load_tokenizer, resolve_model_path, save_checkpoint, write_companions
from prunekit.io.files import INDEX_FILE, CheckpointFiles, SafetensorsWriter
from prunekit.io.outputs import Target, atomic_dir, input_paths, prepare_output
from prunekit.io.stored import saved_tensors
from prunekit.plans import PruningPlan
from prunekit.surgery import apply_plan, apply_widths, mark_drops


def save(model: nn.Module | LayerSource, tokenizer: Any, out: str | Path | Target, plan: PruningPlan | None = None, *,
         force: bool = False, progress: bool = True, extras: Callable[[Path], None] | None = None) -> Path:
    """Write the pruned checkpoint (weights, config, tokenizer, plan) to `out`, all or nothing. A model in
    memory must already carry the plan (as `llm_drop` / `width_prune` / `apply_plan` leave it); a streamed
    one is cut from its source files. `extras(folder)` writes a job's own files (reports) into the folder
    before it is renamed into place, so they are part of the all-or-nothing output. `out` is best the `Target`
    a job checked before its work (`io.outputs.prepare_output`): it is published only if still as checked."""
    if isinstance(model, StreamedLayers):
        if plan is None:
            raise CheckpointError("saving a streamed model needs the plan to apply to its source files")
        return save_pruned_streamed(model.path, plan, out, force=force, dtype=model.dtype, tokenizer=tokenizer,
                                    progress=progress, overrides=model.overrides, extras=extras)
    module = model.model if isinstance(model, ResidentLayers) else model
    return save_checkpoint(module, tokenizer, out, plan, force=force, extras=extras)


@dataclass
class _Shard:
    names: list[str]
    nbytes: int


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[_Shard]:
    """Consecutive names grouped greedily into shards of at most `max_bytes` (a bigger tensor alone)."""
    shards: list[_Shard] = []
    cur = _Shard([], 0)
    for name, n in sizes:
        if cur.names and cur.nbytes + n > max_bytes:
            shards.append(cur)
            cur = _Shard([], 0)
        cur.names.append(name)
        cur.nbytes += n
    if cur.names:
        shards.append(cur)
    return shards


def _layer_of(name: str, layers_prefix: str) -> tuple[int, str] | None:
    if not name.startswith(layers_prefix):
        return None
    idx, _, rest = name[len(layers_prefix):].partition(".")
    return int(idx), rest


class _LayerValues:
    """The saved tensors of each kept layer of the pruned model, produced one layer at a time: the source layer
    is materialised, cut by the plan's widths and drops with the ordinary surgery, released, and its tensors
    converted to the names `save_pretrained` writes (`io.stored.saved_tensors`)."""

    def __init__(self, source: StreamedLayers, plan: PruningPlan, keep: list[int], pruned: nn.Module):
        self.source = source
        self.plan = plan
        self.keep = keep
        self.pruned = pruned
        self.drops: dict[int, list[Any]] = defaultdict(list)
        for d in plan.dropped:
            self.drops[d.layer].append(d)
        self.current: tuple[int, dict[str, torch.Tensor]] | None = None

    def get(self, new_idx: int) -> dict[str, torch.Tensor]:
        if self.current is not None and self.current[0] == new_idx:
            return self.current[1]
        self.current = None
        i = self.keep[new_idx]
        ad = self.source.adapter
        layer = self.source.materialise_layer(i)
        try:
            if i in self.plan.widths:
                apply_widths(ad, {i: self.plan.widths[i]})
            mark_drops(ad, self.drops.get(i, []))
            prefix = ad.layer_prefix(new_idx)
            tensors = saved_tensors(self.pruned, {prefix + k: v.detach() for k, v in layer.state_dict().items()})
        finally:
            self.source.release(layer)
        self.current = (new_idx, tensors)
        return tensors


def save_pruned_streamed(src: str | Path, plan: PruningPlan, out: str | Path | Target, *, force: bool = False,
                         dtype: str | torch.dtype | None = None, tokenizer: Any = None,
                         max_shard_bytes: int = 1 << 30, progress: bool = True,
                         overrides: dict[str, torch.Tensor] | None = None,
                         extras: Callable[[Path], None] | None = None) -> Path:
    """Write the pruned checkpoint of `plan` applied to the local checkpoint `src`, never holding more than
    one layer in memory (see the module docstring). `dtype`: of the written weights (None keeps the source
    checkpoint's). `tokenizer`: saved alongside; None loads the source's own. `overrides`: layer tensors (by
    state-dict name, at the source's full shape) written in place of the files' values, cut by the plan like
    them (`compress`'s refitted projections). `extras`: as in `save`."""
    src_dir = Path(resolve_model_path(src))
    out = prepare_output(out, force, inputs=input_paths(src_dir))
    if dtype is None:
        dtype = _checkpoint_dtype(src_dir)
    pruned = StreamedLayers(src_dir, dtype=dtype)
    ad = pruned.adapter
    original = {id(layer): i for i, layer in enumerate(ad.layers())}
    apply_plan(ad, plan, structure_only=True)  # the edited weights come from `overrides`
    keep = [original[id(layer)] for layer in ad.layers()]
    values_source = StreamedLayers(src_dir, dtype=dtype)
    values_source.overrides = dict(overrides or {})
    values = _LayerValues(values_source, plan, keep, pruned.model)
    saved, origin = _saved_specs(pruned.model, ad.spec.layers + ".")
    shards = _plan_shards([(n, saved[n].numel() * saved[n].element_size()) for n in saved], max_shard_bytes)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(src_dir)
    meta_sd = pruned.model.state_dict()
    other: tuple[str, dict[str, torch.Tensor]] | None = None  # the last tensor outside the layers, as saved

    def other_tensor(n: str, module_name: str) -> torch.Tensor:
        nonlocal other
        if other is None or other[0] != module_name:
            t = pruned.load({module_name: None})[module_name]
            meta = meta_sd[module_name]
            t = t.to(meta.dtype) if t.is_floating_point() and meta.is_floating_point() else t
            other = (module_name, saved_tensors(pruned.model, {module_name: t}))
        return other[1][n]

    with atomic_dir(out) as tmp:
        weight_map: dict[str, str] = {}
        for s, shard in enumerate(tqdm(shards, desc="writing shards", disable=not progress, leave=False)):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
            specs = [(n, saved[n].dtype, tuple(saved[n].shape)) for n in shard.names]
            with SafetensorsWriter(tmp / fname, specs, metadata={"format": "pt"}) as writer:
                for n in shard.names:
                    where = origin[n]
                    t = values.get(where)[n] if isinstance(where, int) else other_tensor(n, where)
                    writer.write(n, t)  # checks name, dtype and shape against the pruned skeleton
                    weight_map[n] = fname
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        write_companions(tmp, tokenizer, _save_configs(pruned.model, tmp), plan, source=src_dir)
        if extras is not None:
            extras(tmp)
        pause_point("saving")
    return Path(out)


def _saved_specs(model: nn.Module, layers_prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, int | str]]:
    """(the tensors `save_pretrained` writes for `model`, as meta tensors in the order they are written; where
    each comes from: a layer index, or the module tensor's name outside the layers). The state dict less tied
    duplicates, each layer's tensors converted together (a fused MoE tensor becomes one tensor per expert)."""
    sd = model.state_dict()
    kept = remove_tied_weights_from_state_dict(dict(sd), model)
    groups: list[tuple[int | str, dict[str, torch.Tensor]]] = []
    for n in sd:
        if n not in kept:
            continue
        where = _layer_of(n, layers_prefix)
        key: int | str = where[0] if where is not None else n
        if groups and groups[-1][0] == key:
            groups[-1][1][n] = sd[n]
        else:
            groups.append((key, {n: sd[n]}))
    saved: dict[str, torch.Tensor] = {}
    origin: dict[str, int | str] = {}
    for key, tensors in groups:
        for name, meta in saved_tensors(model, tensors).items():
            if name in saved:
                raise CheckpointError(f"internal error: two tensors of {type(model).__name__} are saved as {name}")
            saved[name], origin[name] = meta, key
    return saved, origin


def _save_configs(model: nn.Module, directory: Path) -> config_edit.RemoteClasses | None:
    """config.json (sealed) and generation_config.json as `save_checkpoint` writes them. Returns the classes
    the checkpoint's remote code must define (heterogeneous), or None."""
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    config_edit.drop_foreign_auto_map(model.config)
    model.config.save_pretrained(directory)
    remote = config_edit.seal_config_file(directory / "config.json")
    if model.can_generate():  # type: ignore[operator]
        model.generation_config.save_pretrained(directory)
    return remote


def _checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (its config's `dtype`, else its first float tensor)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from e
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return CheckpointFiles(path).first_float_dtype() or torch.float32


call_as(__name__, save)  # `prunekit.save(...)` calls `save` even once this module is the package attribute
