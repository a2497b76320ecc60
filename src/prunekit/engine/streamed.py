"""Streamed layers: a model larger than the memory it is given, as a layer source.

The model is built as a *skeleton* on the meta device (no weights). The runner asks for one decoder layer at
a time; it is materialised straight from the memory-mapped safetensors files, every calibration batch's
hidden states are pushed through it, and it is released before the next one is loaded. Peak memory is one
layer's weights plus the calibration hidden states (which can spill to disk), whatever the number of layers.
The same layer modules are called with the same weights, inputs and keyword arguments as a resident model,
so on the same device the hidden states, and hence every statistic, equal the in-memory ones.

Width pruning and expert surgery narrow the meta skeleton with the ordinary surgery (shapes only);
`set_widths` records the kept original indices, and every later read cuts each layer from the files already
to them (`surgery.widths.width_slices`).

A tensor the checkpoint stores under another name or in pieces (a Mixture-of-Experts layer's fused experts,
saved one tensor per expert) is found by the family's own conversion mapping (`io.stored.StoredLayout`); a
cut fused tensor is built from the kept experts' stored tensors only, each cut to its kept channels.

Plans and drops work on the skeleton unchanged (drops replace modules; weights are only read when a layer is
materialised, and only the tensors the current modules have are read). `prunekit.save` writes the pruned
checkpoint tensor by tensor from the source files.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from prunekit.adapters import ModelAdapter, get_adapter
from prunekit.adapters.units import Cut, apply_cut
from prunekit.engine.sources import LayerCall, capture_calls
from prunekit.errors import CheckpointError
from prunekit.io.checkpoint import build_skeleton, parse_dtype, resolve_model_path
from prunekit.io.files import CheckpointFiles
from prunekit.io.stored import StoredLayout
from prunekit.plans import LayerWidth
from prunekit.surgery.widths import width_slices


class StreamedLayers:
    """A meta-device skeleton of a local checkpoint plus the means to materialise one module at a time.

    `adapter` is an ordinary `ModelAdapter` over the skeleton, so plans, drops and width surgery work on it
    unchanged."""

    resumable = True

    def __init__(self, path: str | Path, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
        local = Path(resolve_model_path(path))
        if not local.is_dir() or not (local / "config.json").is_file():
            raise CheckpointError(f"layer streaming needs a local checkpoint directory with config.json; got {path!r}")
        self.path = local
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        self.files = CheckpointFiles(local)
        self.model = build_skeleton(local, self.dtype)
        self.adapter: ModelAdapter = get_adapter(self.model)
        # The family's checkpoint conversions: renamed tensors, and fused ones stored in pieces (MoE experts).
        self.layout = StoredLayout(self.model, self.files.names())
        # Checkpoint keys follow module names; a tied embedding may be stored under either of its names.
        tied = dict(getattr(self.model, "all_tied_weights_keys", None) or {})
        self._aliases: dict[str, str] = {}
        for target, source in tied.items():
            self._aliases[target] = source
            self._aliases[source] = target
        first_layer = self.adapter.layer_prefix(0)
        if self.adapter.num_layers and not any(n.startswith(first_layer) for n in self.files.names()):
            raise CheckpointError(
                f"{local}: no tensors named {first_layer}*; layer streaming needs checkpoint tensor names that "
                "follow the model's module names (re-save it with this transformers version)")
        self._check_stored()
        self._aux_ready = False
        self.widths: dict[int, LayerWidth] = {}
        # The stored tensors' unit counts, by layer module (a fused tensor's slices start at original offsets).
        self._stored = {id(layer): self.adapter.unit_widths(layer) for layer in self.adapter.layers()}
        # Edited tensors (state-dict name -> value at the checkpoint's full shape), read instead of the files.
        self.overrides: dict[str, torch.Tensor] = {}
        self._committed: dict[str, torch.Tensor] = {}

    def _check_stored(self) -> None:
        """Every parameter of the model has its stored tensor(s), checked before any long work."""
        missing = self.layout.short(self.model)
        for name, _ in self.model.named_parameters(remove_duplicate=False):
            if name not in self.layout.fused:
                try:
                    self.source_name(name)
                except CheckpointError:
                    missing.append(name)
        if missing:
            raise CheckpointError(
                f"{self.path}: no stored tensor for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
                "layer streaming reads unquantized checkpoints in the layout transformers' conversion mapping for "
                f"{self.model.config.model_type} describes (re-save it with save_pretrained)")

    # --- materialisation ---------------------------------------------------------------------------------
    def source_name(self, name: str) -> str:
        """The checkpoint tensor that holds the module tensor `name`: itself, the name the family's conversion
        mapping renames it from, or its tied twin. (A tensor built from several stored ones has none.)"""
        for candidate in (name, self._aliases.get(name)):
            if candidate is None:
                continue
            if candidate in self.files:
                return candidate
            if candidate in self.layout.renamed:
                return self.layout.renamed[candidate]
        raise CheckpointError(f"{self.path} has no tensor {name!r}")

    def load(self, wanted: Mapping[str, Cut | None]) -> dict[str, torch.Tensor]:
        """Module tensors by name, each cut by its cut (None: whole), in the stored dtypes, on the device. A
        tensor the checkpoint stores in pieces (an MoE layer's experts) is built from the kept pieces only."""
        plain = {n: self.source_name(n) for n in wanted if n not in self.layout.fused}
        loaded = self.files.load(set(plain.values()), self.device)
        out = {n: apply_cut(loaded[stored], wanted[n]) for n, stored in plain.items()}
        for n in wanted:
            if n in self.layout.fused:
                out[n] = self.layout.read_fused(n, lambda names: self.files.load(names, self.device), wanted[n],
                                                self.model.config)
        return out

    def materialise(self, module: nn.Module, prefix: str, slices: Mapping[str, Cut] | None = None) -> None:
        """Give `module` (whose tensor names start with `prefix`) its weights from the files, in the dtypes the
        skeleton chose, then compute non-persistent buffers (rotary frequencies, embedding scales) the way
        transformers does when it loads a checkpoint (`_init_weights`).

        `slices`: {tensor name relative to `module`: cut} taken from the stored tensors, for a module the
        skeleton has narrowed."""
        wanted = module.state_dict(keep_vars=True)
        cuts = dict(slices or {})
        loaded = self.load({prefix + k: cuts.get(k) for k in wanted if prefix + k not in self.overrides})
        sd: dict[str, torch.Tensor] = {}
        for k, meta in wanted.items():
            edited = self.overrides.get(prefix + k)
            t = apply_cut(edited.to(self.device), cuts.get(k)) if edited is not None else loaded[prefix + k]
            if tuple(t.shape) != tuple(meta.shape):
                raise CheckpointError(f"{self.path}: tensor {prefix + k} has shape {tuple(t.shape)}, the config "
                                      f"expects {tuple(meta.shape)}")
            sd[k] = t.to(dtype=meta.dtype) if t.is_floating_point() and meta.is_floating_point() else t
        module.load_state_dict(sd, strict=True, assign=True)
        self._init_buffers(module)

    def _init_buffers(self, module: nn.Module) -> None:
        for sub in module.modules():
            meta = [(n, b) for n, b in sub.named_buffers(recurse=False) if b is not None and b.is_meta]
            if not meta:
                continue
            # transformers' init functions skip tensors flagged as initialised: keep the loaded weights.
            for p in sub.parameters(recurse=False):
                p._is_hf_initialized = True  # type: ignore[attr-defined]
            for n, b in meta:
                persistent = n not in sub._non_persistent_buffers_set
                sub.register_buffer(n, torch.empty_like(b, device=self.device), persistent=persistent)
            self.model._init_weights(sub)  # type: ignore[operator]

    @staticmethod
    def release(module: nn.Module) -> None:
        """Drop a module's weights (back to meta); the memory-mapped pages go with the tensors."""
        module.to_empty(device="meta")

    def materialise_layer(self, i: int) -> nn.Module:
        """Decoder layer `i` with its weights (narrowed to `widths[i]` when set); `release` it after use."""
        layer = self.adapter.layers()[i]
        w = self.widths.get(i)
        slices = None if w is None else width_slices(self.adapter, layer, w, self._stored.get(id(layer)))
        self.materialise(layer, self.adapter.layer_prefix(i), slices)
        return layer

    # --- the LayerSource protocol ----------------------------------------------------------------------------
    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        layer = self.materialise_layer(i)
        try:
            yield layer
        finally:
            self.release(layer)

    def set_widths(self, widths: Mapping[int, LayerWidth]) -> None:
        self.widths = dict(widths)

    @contextmanager
    def head(self) -> Iterator[None]:
        norm, head = self.adapter.final_norm(), self.adapter.lm_head()
        self.materialise(norm, self.adapter.spec.final_norm + ".")
        self.materialise(head, self.adapter.spec.lm_head + ".")
        try:
            yield
        finally:
            self.release(norm)
            self.release(head)
            if self._aliases:  # as in `embedding`: loading untied a tied LM head
                self.model.tie_weights()

    def read(self, name: str) -> torch.Tensor:
        if name in self.overrides:
            return self.overrides[name]
        t = self.load({name: None})[name]
        return t.to(self.model.get_parameter(name).dtype) if t.is_floating_point() else t

    def write(self, name: str, value: torch.Tensor) -> None:
        self.overrides[name] = value.detach().to("cpu", copy=True)

    def revert(self) -> None:
        self.overrides = dict(self._committed)

    def commit(self) -> None:
        # The overrides stay, and `prunekit.save` writes them in place of the files' values.
        self._committed = dict(self.overrides)

    def capture(self, ids: torch.Tensor, mask: torch.Tensor, *,
                embed: bool = False) -> tuple[torch.Tensor | None, dict[int, LayerCall]]:
        if not self._aux_ready:  # the rotary embedding, typically: small, needed for every capture
            for prefix, child in self.adapter.aux_modules():
                self.materialise(child, prefix)
            self._aux_ready = True
        return capture_calls(self.adapter, ids, mask, self.device, embed=embed, dtype=self.dtype)

    @contextmanager
    def embedding(self) -> Iterator[None]:
        emb = self.adapter.embed()
        self.materialise(emb, self.adapter.spec.embed + ".")
        try:
            yield
        finally:
            self.release(emb)
            # Loading assigned the embedding a new Parameter, which unties a tied LM head; tie it again so
            # the skeleton stays the model `from_pretrained` builds (parameter counts, saved tensor names).
            if self._aliases:
                self.model.tie_weights()
