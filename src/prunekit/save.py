"""One way to save a pruned model: `save(model_or_source, tokenizer, out, plan)`.

A model in memory (or its `ResidentLayers`) is saved with `save_pretrained` (`io.checkpoint.save_checkpoint`).
A layer-streamed model (`StreamedLayers`) never holds its weights, so its pruned checkpoint is written
tensor by tensor from the source files: the plan is applied to a fresh meta skeleton with the ordinary
`surgery.apply_plan` (so the config and the tensor names are exactly the in-memory result's), and the values
of each kept layer come from materialising that one source layer and running the same surgery on it. Each
tensor goes straight into its shard (`io.files.SafetensorsWriter`: the header first, from the skeleton's
names, dtypes and shapes), so memory holds one layer, never a whole shard. The result equals, tensor for
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
    """The tensors of each kept layer of the pruned model, produced one layer at a time: the source layer is
    materialised, cut by the plan's widths and drops with the ordinary surgery, and released."""

    def __init__(self, source: StreamedLayers, plan: PruningPlan, keep: list[int]):
        self.source = source
        self.plan = plan
        self.keep = keep
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
            tensors = {k: v.detach() for k, v in layer.state_dict().items()}
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
    values = _LayerValues(values_source, plan, keep)
    names = _saved_names(pruned.model)
    meta_sd = pruned.model.state_dict()
    shards = _plan_shards([(n, meta_sd[n].numel() * meta_sd[n].element_size()) for n in names], max_shard_bytes)
    layers_prefix = ad.spec.layers + "."
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(src_dir)

    def other_tensor(n: str) -> torch.Tensor:
        name = pruned.source_name(n)
        t = pruned.files.load([name], torch.device("cpu"))[name]
        meta = meta_sd[n]
        return t.to(meta.dtype) if t.is_floating_point() and meta.is_floating_point() else t

    with atomic_dir(out) as tmp:
        weight_map: dict[str, str] = {}
        for s, shard in enumerate(tqdm(shards, desc="writing shards", disable=not progress, leave=False)):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
            specs = [(n, meta_sd[n].dtype, tuple(meta_sd[n].shape)) for n in shard.names]
            with SafetensorsWriter(tmp / fname, specs, metadata={"format": "pt"}) as writer:
                for n in shard.names:
                    where = _layer_of(n, layers_prefix)
                    t = values.get(where[0])[where[1]] if where is not None else other_tensor(n)
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


def _saved_names(model: nn.Module) -> list[str]:
    """The tensor names `save_pretrained` writes: the state dict without tied duplicates. Weight-name
    conversions (which some architectures apply on save) are not supported by the streamed writer."""
    sd = model.state_dict()
    kept = remove_tied_weights_from_state_dict(dict(sd), model)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: no conversions
        return [n for n in sd if n in kept]
    reverted = revert_weight_conversion(model, dict(kept))
    if set(reverted) != set(kept):
        raise CheckpointError(f"{type(model).__name__} renames weights when saving; streamed saving does not "
                              "support it (save in memory instead)")
    return [n for n in sd if n in kept]


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
