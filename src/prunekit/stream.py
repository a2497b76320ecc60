"""Layer-streamed calibration and pruning: score and prune a model larger than the memory it is given.

The model is built as a *skeleton* on the meta device (no weights). Calibration then runs layer by layer
instead of batch by batch: ONE decoder layer is materialised straight from the memory-mapped safetensors
files, every calibration batch's hidden states are pushed through it, the running statistics are updated
by the same `SimilarityAccumulator` (and any other observers) as the in-memory path, and the layer is
released before the next one is loaded. Peak memory is one layer's weights plus the calibration hidden
states (which can spill to disk, `work_dir`), whatever the number of layers.

How layers are called. Masks (causal, sliding-window, per-layer-type) and rotary embeddings are not
re-implemented here: the model's own forward computes them. The decoder layers of the skeleton are swapped
for `_CallRecorder` stubs that record the (args, kwargs) each layer is called with and return their input,
the final norm for an identity; with the rotary module (and, for the first step, the embedding)
materialised, one forward of the base model gives every layer's call exactly as the in-memory model makes
it. Later steps record calls with the embedding replaced by a zero stub (masks and rotary embeddings
depend on shapes, positions and the attention mask, not on the embedding values), so the embedding is
loaded once, for the layer-0 states only.

Bit-for-bit. The same layer modules are called with the same weights, inputs and keyword arguments as in
`CalibrationRunner`, so on the same device the hidden states, and hence the scores, equal the in-memory
ones (the tests check |diff| < 1e-6 and in practice see 0).

Resuming. With a `work_dir`, hidden states live in files there and, after every finished layer, the
accumulator sums and the index of the next layer are written atomically (`_progress.safetensors`): an
interrupted run started again with the same `work_dir` continues at the next layer. The caller keys the
directory by model, calibration tokens and options (`prunekit.score_cache`).

Width pruning. `StreamedWidthCollector` gives `width.width_prune` its statistics from streamed passes. The
shots narrow the meta skeleton with the ordinary width surgery (shapes only), `StreamedModel.widths` records
the kept original indices, and every later pass reads each layer already cut to them
(`width_surgery.width_slices`), so the statistics, the plan and the checkpoint equal the in-memory ones.

Saving. `save_pruned_streamed` writes a pruned checkpoint shard by shard from the source files: the plan is
applied to a meta skeleton with the ordinary `surgery.apply_plan` (so the config and the tensor names are
exactly the in-memory result's), and the values of each kept layer are produced by materialising that one
source layer and running the same width/drop surgery on it. Each tensor goes straight into its shard file
(`SafetensorsWriter`: the header comes first, from the skeleton's names, dtypes and shapes), so memory
holds one layer, never a whole shard.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.adapters import ModelAdapter, get_adapter
from prunekit.checkpoint import (
    commit_dir,
    model_class_for,
    parse_dtype,
    prepare_output_dir,
    resolve_model_path,
    write_companions,
)
from prunekit.data import CalibrationData
from prunekit.errors import CheckpointError, PrunekitError
from prunekit.plans import LayerWidth, PruningPlan
from prunekit.scoring import SimilarityAccumulator, SimilarityScores, unit_rows

INDEX_FILE = "model.safetensors.index.json"
PROGRESS_FILE = "_progress.safetensors"
PROGRESS_FORMAT = "1"


class ActivationOverflowError(PrunekitError):
    """Hidden states became inf/NaN (typically float16 overflow): the scores would be meaningless."""


# --- memory ------------------------------------------------------------------------------------------------------

def available_memory_bytes() -> int:
    """Memory this process can still use: MemAvailable (psutil when installed, else /proc/meminfo), capped by
    a cgroup v2 limit (containers) when one is set."""
    avail: int | None = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    if avail is None:
        avail = 1 << 62  # unknown: assume plenty (never stream automatically on a guess)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def device_free_bytes(device: torch.device) -> int:
    """Free memory of an accelerator device, or the host's available memory for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_memory_bytes()


def should_stream(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                  *, headroom: float = 1.3) -> bool:
    """Whether the checkpoint would not fit: its weights in `dtype`, times `headroom` (loading copies,
    activations, the Python process), exceed the free memory of `device`. A non-local model (hub id) is
    never streamed (streaming reads local safetensors files)."""
    local = Path(resolve_model_path(path))
    if not local.is_dir() or not list(local.glob("*.safetensors")):
        return False
    need = CheckpointFiles(local).numel_bytes(parse_dtype(dtype))
    return need * headroom > device_free_bytes(torch.device(device))


# --- checkpoint files --------------------------------------------------------------------------------------------

@contextmanager
def open_safetensors(path: str | Path, device: str | torch.device = "cpu") -> Iterator[Any]:
    """`safetensors.safe_open`, with a damaged or unreadable file reported as one `CheckpointError`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as st:
            yield st
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download or re-save it") from e


class CheckpointFiles:
    """Where each tensor of a local safetensors checkpoint lives (one file, or shards with an index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        self.file_of: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is corrupt: {e}") from e
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(f"{self.path} is missing weight shards: {', '.join(missing)}")
            self.file_of = dict(weight_map)
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path} has no *.safetensors weights; layer streaming reads safetensors "
                                      "files only (re-save the checkpoint with safe_serialization=True)")
            for f in files:
                with open_safetensors(f) as st:
                    for name in st.keys():
                        self.file_of[name] = f.name

    def names(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def numel_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of all tensors once loaded in `dtype` (floating tensors; others keep their stored size)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        total = 0
        by_file: dict[str, list[str]] = defaultdict(list)
        for name, f in self.file_of.items():
            by_file[f].append(name)
        for f, names in by_file.items():
            with open_safetensors(self.path / f) as st:
                for name in names:
                    sl = st.get_slice(name)
                    total += math.prod(sl.get_shape()) * (itemsize if sl.get_dtype() in _FLOAT_TYPES
                                                          else _STORED_SIZE.get(sl.get_dtype(), 4))
        return total

    def load(self, names: Iterable[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Tensors by name. On the CPU they are memory-mapped views of the files (no copy is made until a
        dtype conversion asks for one; pages are read when touched and go with the tensor)."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.file_of:
                raise CheckpointError(f"{self.path} has no tensor {name!r}")
            by_file[self.file_of[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        for f, group in by_file.items():
            with open_safetensors(self.path / f, device) as st:
                for name in group:
                    out[name] = st.get_tensor(name)
        return out


_FLOAT_TYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_STORED_SIZE = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _get_module(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted) if dotted else root


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(_get_module(root, parent), name, module)


def _first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def load_generation_config(path: Path) -> Any:
    """The generation config `from_pretrained` would attach (its file, or one derived from config.json), so
    that a streamed save writes the same generation_config.json as the in-memory path."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(path))
    except OSError:
        return GenerationConfig.from_pretrained(str(path), config_file_name="config.json", _from_model_config=True)


def build_skeleton(path: str | Path, dtype: str | torch.dtype = "float32") -> nn.Module:
    """The model of a local checkpoint built on the meta device: every module and shape, no weight memory.
    The class is the one `checkpoint.load_model` uses (stock, or prunekit's heterogeneous wrapper)."""
    from transformers import AutoConfig

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


# --- the streamed model ------------------------------------------------------------------------------------------

class _CallRecorder(nn.Module):
    """Stands in for decoder layer `index` during a capture forward: records how it was called (everything
    but the hidden states) and passes the hidden states on unchanged."""

    def __init__(self, index: int, calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]],
                 inputs: dict[int, torch.Tensor]):
        super().__init__()
        self.index = index
        self.calls = calls
        self.inputs = inputs

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls[self.index] = (args, kwargs)
        if self.index == 0:
            self.inputs[0] = hidden_states
        return hidden_states


class _ZeroEmbedding(nn.Module):
    """Stands in for the token embedding when only the layers' call arguments are wanted."""

    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.hidden_size = hidden_size
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.hidden_size, dtype=self.dtype, device=input_ids.device)


LayerCall = tuple[tuple[Any, ...], dict[str, Any]]


class StreamedModel:
    """A meta-device skeleton of a local checkpoint plus the means to materialise one module at a time.

    `adapter` is an ordinary `ModelAdapter` over the skeleton, so plans, `surgery.mark_drops` and
    `drop.llm_drop` work on it unchanged (drops replace modules; weights are only read when a layer is
    materialised, and only the tensors the current modules have are read)."""

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
        spec = self.adapter.spec
        self.base_path = spec.layers.rpartition(".")[0]
        # Checkpoint keys follow module names; a tied embedding may be stored under either of its names.
        tied = dict(getattr(self.model, "all_tied_weights_keys", None) or {})
        self._aliases: dict[str, str] = {}
        for target, source in tied.items():
            self._aliases[target] = source
            self._aliases[source] = target
        first_layer = f"{spec.layers}.0."
        if self.adapter.num_layers and not any(n.startswith(first_layer) for n in self.files.names()):
            raise CheckpointError(
                f"{local}: no tensors named {first_layer}*; layer streaming needs checkpoint tensor names that "
                "follow the model's module names (re-save it with this transformers version)")
        self._aux_ready = False
        # Kept ORIGINAL indices of layers the skeleton has been narrowed to (streamed width pruning narrows
        # the meta skeleton with the ordinary surgery and records here what to cut from the stored tensors).
        self.widths: dict[int, LayerWidth] = {}

    # --- materialisation ---------------------------------------------------------------------------------
    def source_name(self, name: str) -> str:
        """The checkpoint tensor that holds the module tensor `name` (itself, or its tied twin)."""
        if name in self.files:
            return name
        alias = self._aliases.get(name)
        if alias is not None and alias in self.files:
            return alias
        raise CheckpointError(f"{self.path} has no tensor {name!r}")

    def materialise(self, module: nn.Module, prefix: str,
                    slices: dict[str, tuple[int, torch.Tensor]] | None = None) -> None:
        """Give `module` (whose full name is `prefix` without the trailing dot) its weights from the files,
        in the dtypes the skeleton chose, then compute non-persistent buffers (rotary frequencies, embedding
        scales) the way transformers does when it loads a checkpoint (`_init_weights`).

        `slices`: {tensor name relative to `module`: (dim, kept indices)} cut from the stored tensors first,
        for a module the skeleton has narrowed (`width_surgery.width_slices`)."""
        wanted = module.state_dict(keep_vars=True)
        sources = {k: self.source_name(prefix + k) for k in wanted}
        loaded = self.files.load(set(sources.values()), self.device)
        sd: dict[str, torch.Tensor] = {}
        for k, meta in wanted.items():
            t = loaded[sources[k]]
            if slices and k in slices:
                dim, idx = slices[k]
                t = t.index_select(dim, idx.to(t.device))
            if tuple(t.shape) != tuple(meta.shape):
                raise CheckpointError(f"{self.path}: tensor {sources[k]} has shape {tuple(t.shape)}, the config "
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

    def layer_prefix(self, i: int) -> str:
        return f"{self.adapter.spec.layers}.{i}."

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Decoder layer `i` with its weights, released on exit (narrowed to `widths[i]` when set)."""
        layer = self.adapter.layers()[i]
        w = self.widths.get(i)
        slices = None
        if w is not None:
            from prunekit.width_surgery import width_slices

            slices = width_slices(self.adapter, layer, w)
        self.materialise(layer, self.layer_prefix(i), slices)
        try:
            yield layer
        finally:
            self.release(layer)

    def _aux_modules(self) -> list[tuple[str, nn.Module]]:
        """Children of the base model other than the layers, the embedding and the final norm (the rotary
        embedding, typically): small, needed for every call capture."""
        base = self.adapter.base_model()
        skip = {id(self.adapter.layers()), id(self.adapter.embed()), id(self.adapter.final_norm())}
        return [(name, child) for name, child in base.named_children() if id(child) not in skip]

    def _ensure_aux(self) -> None:
        if self._aux_ready:
            return
        for name, child in self._aux_modules():
            self.materialise(child, f"{self.base_path}.{name}.")
        self._aux_ready = True

    # --- call capture ------------------------------------------------------------------------------------
    @contextmanager
    def _stubbed(self, calls: dict[int, LayerCall], inputs: dict[int, torch.Tensor], *,
                 zero_embed: bool) -> Iterator[None]:
        ad = self.adapter
        spec = ad.spec
        layers, norm, embed = ad.layers(), ad.final_norm(), ad.embed()
        ad.set_layers(nn.ModuleList([_CallRecorder(i, calls, inputs) for i in range(len(layers))]))
        _set_module(self.model, spec.final_norm, nn.Identity())
        if zero_embed:
            _set_module(self.model, spec.embed, _ZeroEmbedding(ad.hidden_size, self.dtype))
        try:
            yield
        finally:
            ad.set_layers(layers)
            _set_module(self.model, spec.final_norm, norm)
            _set_module(self.model, spec.embed, embed)

    @torch.no_grad()
    def capture(self, ids: torch.Tensor, mask: torch.Tensor, *,
                embed: bool = False) -> tuple[torch.Tensor | None, dict[int, LayerCall]]:
        """One base-model forward with recording stubs for layers: (layer-0 input if `embed`, else None;
        {layer: (args, kwargs)}). The call is the one `CalibrationRunner` makes."""
        self._ensure_aux()
        calls: dict[int, LayerCall] = {}
        inputs: dict[int, torch.Tensor] = {}
        with self._stubbed(calls, inputs, zero_embed=not embed):
            self.adapter.base_model()(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      use_cache=False)
        return (inputs.get(0) if embed else None), calls

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


# --- observers and storage ---------------------------------------------------------------------------------------

class StreamObserver:
    """Told about every (layer, batch) of a streamed pass. Override what you need.

    `begin_layer` runs once the layer has its weights (register hooks on its sub-modules there, e.g. the
    inputs of `o_proj` / `down_proj` for width importances), `__call__` after each batch went through it,
    `end_layer` before it is released."""

    def begin_layer(self, i: int, layer: nn.Module) -> None:
        pass

    def begin_batch(self, b: int) -> None:
        pass

    def __call__(self, i: int, layer: nn.Module, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                 mask: torch.Tensor | None) -> None:
        pass

    def end_layer(self, i: int, layer: nn.Module) -> None:
        pass


class FiniteCheck(StreamObserver):
    """Raises `ActivationOverflowError` when a layer's output holds inf/NaN."""

    def __call__(self, i: int, layer: nn.Module, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                 mask: torch.Tensor | None) -> None:
        check_finite(h_out, f"layer {i}")


def check_finite(h: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(h).all()):
        raise ActivationOverflowError(
            f"{where} produced inf/NaN hidden states in {str(h.dtype).removeprefix('torch.')} (values beyond the "
            "dtype's range); score in bfloat16 or float32 (--dtype bfloat16 / float32) instead")


class _TensorStore:
    """Tensors by key, in RAM or as files in a directory (written atomically, so a killed run leaves only
    complete files)."""

    def __init__(self, directory: Path | None):
        self.dir = directory
        self.mem: dict[str, torch.Tensor] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / f"{key}.pt"

    def put(self, key: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        if self.dir is None:
            self.mem[key] = t
            return
        tmp = self.dir / f".{key}.tmp"
        torch.save(t, tmp)
        os.replace(tmp, self._file(key))

    def get(self, key: str, device: torch.device | None = None) -> torch.Tensor:
        t = self.mem[key] if self.dir is None else torch.load(self._file(key), weights_only=True)
        return t if device is None else t.to(device)

    def has(self, key: str) -> bool:
        return key in self.mem if self.dir is None else self._file(key).is_file()

    def delete(self, key: str) -> None:
        if self.dir is None:
            self.mem.pop(key, None)
        else:
            self._file(key).unlink(missing_ok=True)


def _h_key(layer: int, batch: int) -> str:
    return f"h{layer:05d}-b{batch:06d}"


def _u_key(state: int, batch: int) -> str:
    return f"u{state:05d}-b{batch:06d}"


# --- the streamed runner -----------------------------------------------------------------------------------------

class LayerStreamer:
    """Runs calibration data through a streamed model layer by layer, calling observers.

    Hidden states at layer boundaries are kept in a `_TensorStore` (RAM, or files under `work_dir`). For
    partial re-runs (`remember_inputs`), the inputs of every k-th layer are kept within `state_budget_bytes`,
    as in `CalibrationRunner`; layer 0's input is always kept, so a re-run never reloads the embedding."""

    def __init__(self, sm: StreamedModel, calib: CalibrationData, *, batch_size: int = 4,
                 work_dir: Path | None = None, remember_inputs: bool = False, state_budget_bytes: int = 2 << 30,
                 progress: bool = True):
        self.sm = sm
        self.calib = calib
        self.batches = calib.batches(batch_size)
        self.store = _TensorStore(work_dir)
        self.progress = progress
        n_layers = sm.adapter.num_layers
        per_layer = calib.input_ids.numel() * sm.adapter.hidden_size * sm.dtype.itemsize
        stride = max(1, -(-per_layer * n_layers // max(state_budget_bytes, 1)))
        self.kept_layers: set[int] = {0}
        if remember_inputs and per_layer <= state_budget_bytes:
            self.kept_layers = set(range(0, n_layers, stride))
        # Boundaries whose states in the store are valid for the model as it is now.
        self.valid: set[int] = set()

    def restart_layer(self, start_layer: int) -> int:
        """The layer a run asked to start at `start_layer` really starts at (0 = from the token ids)."""
        return max((k for k in self.valid if k <= start_layer), default=0)

    @torch.no_grad()
    def run(self, observers: Sequence[StreamObserver], *, start_layer: int = 0,
            on_layer_done: Callable[[int], None] | None = None, desc: str = "streaming") -> int:
        """Stream every batch through layers `restart_layer(start_layer)`.. (the caller guarantees that no
        layer below `start_layer` changed since the states were computed); returns the start layer."""
        sm, store = self.sm, self.store
        n_layers = sm.adapter.num_layers
        start = self.restart_layer(start_layer)
        if start == 0 and 0 not in self.valid:
            self._embed_all()
        # States past the start are about to be recomputed.
        self.valid = {k for k in self.valid if k <= start}
        dev = sm.device
        state: dict[str, torch.Tensor] = {}

        def pre_mid(module: nn.Module, args: tuple[Any, ...]) -> None:
            state["mid"] = args[0]  # the residual stream between the attention and the MLP

        bar = tqdm(range(start, n_layers), desc=desc, disable=not self.progress, leave=False)
        for i in bar:
            with sm.layer(i) as layer:
                handle = sm.adapter.mid_residual_module(layer).register_forward_pre_hook(pre_mid)
                try:
                    for obs in observers:
                        obs.begin_layer(i, layer)
                    for b, (ids, mask) in enumerate(self.batches):
                        _, calls = sm.capture(ids, mask)
                        args, kwargs = calls[i]
                        h_in = store.get(_h_key(i, b), dev)
                        h_out = _first_tensor(layer(h_in, *args, **kwargs))
                        mask_dev = mask.to(dev)
                        for obs in observers:
                            obs.begin_batch(b)
                            obs(i, layer, h_in, state["mid"], h_out, mask_dev)
                        store.put(_h_key(i + 1, b), h_out)
                    for obs in observers:
                        obs.end_layer(i, layer)
                finally:
                    handle.remove()
            self.valid.add(i + 1)
            if i not in self.kept_layers:
                for b in range(len(self.batches)):
                    store.delete(_h_key(i, b))
                self.valid.discard(i)
            if on_layer_done is not None:
                on_layer_done(i)
        # The last layer's output is only needed by the observers.
        for b in range(len(self.batches)):
            store.delete(_h_key(n_layers, b))
        self.valid.discard(n_layers)
        return start

    def _embed_all(self) -> None:
        """Layer-0 inputs of every batch, computed by the model's own forward with the embedding loaded."""
        with self.sm.embedding():
            for b, (ids, mask) in enumerate(self.batches):
                h0, _ = self.sm.capture(ids, mask, embed=True)
                assert h0 is not None
                check_finite(h0, "the embedding")
                self.store.put(_h_key(0, b), h0)
        self.valid.add(0)

    def resume_at(self, layer: int) -> bool:
        """Trust the stored inputs of `layer` (left by an interrupted run with the same work dir)."""
        if all(self.store.has(_h_key(layer, b)) for b in range(len(self.batches))):
            self.valid = {layer}
            return True
        return False


# --- scoring -----------------------------------------------------------------------------------------------------

class _SimilarityObserver(StreamObserver):
    """Feeds `SimilarityAccumulator.update_layer` and stores the unit rows the pairwise matrix needs (the
    pairwise sums of one batch need all its layers at once, so they are added after the last layer)."""

    def __init__(self, acc: SimilarityAccumulator, store: _TensorStore):
        self.acc = acc
        self.store = store
        self.batch = 0

    def begin_batch(self, b: int) -> None:
        self.batch = b

    def __call__(self, i: int, layer: nn.Module, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                 mask: torch.Tensor | None) -> None:
        sq_out = self.acc.update_layer(i, h_in, h_mid, h_out, mask)
        if self.acc.pair is not None:
            if i == 0:
                self.store.put(_u_key(0, self.batch), unit_rows(h_in, mask))
            self.store.put(_u_key(i + 1, self.batch), unit_rows(h_out, mask, sq_out))


def _progress_path(work_dir: Path) -> Path:
    return work_dir / PROGRESS_FILE


def save_progress(work_dir: Path, next_layer: int, acc: SimilarityAccumulator) -> None:
    """Atomically record that layers < `next_layer` are done, with their sums."""
    from safetensors.torch import save_file

    from prunekit.score_cache import accumulator_tensors

    tmp = work_dir / f".{PROGRESS_FILE}.tmp"
    save_file(accumulator_tensors(acc), str(tmp),
              metadata={"format": PROGRESS_FORMAT, "next_layer": str(next_layer)})
    os.replace(tmp, _progress_path(work_dir))


def load_progress(work_dir: Path) -> tuple[int, SimilarityAccumulator] | None:
    from safetensors import safe_open

    from prunekit.score_cache import accumulator_from_tensors

    path = _progress_path(work_dir)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as st:
            meta = st.metadata() or {}
            tensors = {k: st.get_tensor(k).clone() for k in st.keys()}
        if meta.get("format") != PROGRESS_FORMAT:
            return None
        return int(meta["next_layer"]), accumulator_from_tensors(tensors)
    except Exception:  # a damaged progress file means "start over", never a crash
        return None


class StreamedScorer:
    """LLM-Drop scores of a streamed model; the drop-in counterpart of `calibration.SimilarityScorer`
    (`score(start_layer)` re-runs layers from there on, `acc` holds the running sums).

    With a `work_dir` the hidden states live in files there and the first full pass is resumable; the caller
    keys the directory by model, calibration and options (see `prunekit.score_cache`)."""

    def __init__(self, sm: StreamedModel, calib: CalibrationData, *, batch_size: int = 4, pairwise: bool = True,
                 rescore: bool = True, work_dir: str | Path | None = None, state_budget_bytes: int = 2 << 30,
                 observers: Sequence[StreamObserver] = (), check_overflow: bool = True, progress: bool = True,
                 on_layer_done: Callable[[int], None] | None = None):
        """`observers`: extra per-layer observers (e.g. width importances) run in the same pass.
        `on_layer_done(i)`: called after layer i is finished and saved (progress reporting, tests)."""
        self.sm = sm
        self.adapter = sm.adapter
        self.calib = calib
        self.pairwise = pairwise
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.streamer = LayerStreamer(sm, calib, batch_size=batch_size, work_dir=self.work_dir,
                                      remember_inputs=rescore, state_budget_bytes=state_budget_bytes,
                                      progress=progress)
        self.extra = list(observers)
        self.check = check_overflow
        self.on_layer_done = on_layer_done
        self.acc: SimilarityAccumulator | None = None
        self._runs = 0

    def score(self, start_layer: int = 0) -> SimilarityScores:
        n = self.adapter.num_layers
        # Only the first full pass (of the model as loaded) is resumable: later passes follow drops that a
        # new process would not know about.
        first = self._runs == 0 and start_layer == 0
        self._runs += 1
        resume_from = 0
        if self._runs == 1 and self.work_dir is not None and not first:
            self._clear_work_dir()
        if first and self.work_dir is not None:
            prog = load_progress(self.work_dir)
            if prog is not None and prog[1].num_layers == n and (prog[1].pair is not None) == self.pairwise \
                    and self.streamer.resume_at(prog[0]):
                resume_from, self.acc = prog
            else:
                # Nothing to resume: files from another (or a half-dropped) run must not be trusted.
                self._clear_work_dir()
        if resume_from == 0:
            if self.acc is None or start_layer == 0:
                self.acc = SimilarityAccumulator(n, self.pairwise)
            else:
                self.acc.reset_from(self.streamer.restart_layer(start_layer))
        acc = self.acc
        assert acc is not None
        sim = _SimilarityObserver(acc, self.streamer.store)
        observers: list[StreamObserver] = [sim, *self.extra]
        if self.check:
            observers.insert(0, FiniteCheck())
        resumable = first and self.work_dir is not None

        def done(i: int) -> None:
            if resumable:
                save_progress(self.work_dir, i + 1, acc)  # type: ignore[arg-type]
            if self.on_layer_done is not None:
                self.on_layer_done(i)

        self.streamer.run(observers, start_layer=max(start_layer, resume_from), on_layer_done=done,
                          desc="streamed scoring")
        if acc.pair is not None:
            # Same call as the in-memory path, per batch, over all its layers' unit rows.
            store = self.streamer.store
            for b in range(len(self.streamer.batches)):
                keys = [_u_key(j, b) for j in range(n + 1)]
                acc.update_pairwise([store.get(k, self.sm.device) for k in keys])
                for k in keys:
                    store.delete(k)
        if resumable:
            _progress_path(self.work_dir).unlink(missing_ok=True)  # type: ignore[union-attr]
        return acc.result(self.calib.describe())

    def _clear_work_dir(self) -> None:
        if self.work_dir is not None and self.work_dir.is_dir():
            for f in self.work_dir.iterdir():
                if f.is_file():
                    f.unlink()

    def cleanup(self) -> None:
        """Remove the work directory (hidden states) once no re-score will be asked for."""
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def stream_scores(path: str | Path, calib: CalibrationData, *, dtype: str | torch.dtype = "float32",
                  device: str | torch.device = "cpu", batch_size: int = 4, pairwise: bool = True,
                  work_dir: str | Path | None = None, progress: bool = True) -> SimilarityScores:
    """LLM-Drop scores of a local checkpoint, streamed layer by layer (equal to `drop.score_model`)."""
    sm = StreamedModel(path, dtype=dtype, device=device)
    scorer = StreamedScorer(sm, calib, batch_size=batch_size, pairwise=pairwise, rescore=False, work_dir=work_dir,
                            progress=progress)
    return scorer.score()


# --- width statistics --------------------------------------------------------------------------------------------

class WidthStatsObserver(StreamObserver):
    """Per-column squared sums of every layer's `o_proj` and `down_proj` inputs (`importance.SquaredSums`),
    collected in a streamed pass with the same hooks as the in-memory `width.ActivationCollector`
    (`width.watch_layer` / `width.fold_pending`): the statistics TransAct width pruning ranks heads and
    channels by. `stats[i]` is a `width.LayerActivations`. With `keep_weights` it also holds the output
    projections' `importance.weight_columns` (the weight-activation scorer needs them after the layer is
    released; one vector per projection, not the weight)."""

    def __init__(self, *, attn: bool = True, mlp: bool = True, keep_weights: bool = False):
        self.attn, self.mlp, self.keep_weights = attn, mlp, keep_weights
        self.stats: dict[int, Any] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self.adapter: ModelAdapter | None = None

    def bind(self, adapter: ModelAdapter) -> "WidthStatsObserver":
        self.adapter = adapter
        return self

    def begin_layer(self, i: int, layer: nn.Module) -> None:
        from prunekit.width import watch_layer

        assert self.adapter is not None, "call bind(adapter) first"
        self.stats[i], self._handles = watch_layer(self.adapter, layer, self._pending, attn=self.attn,
                                                   mlp=self.mlp, keep_weights=self.keep_weights)

    def __call__(self, i: int, layer: nn.Module, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                 mask: torch.Tensor | None) -> None:
        from prunekit.width import fold_pending

        fold_pending(self.stats[i], self._pending, mask)

    def end_layer(self, i: int, layer: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class StreamedWidthCollector:
    """The layer-streamed `width.WidthCollector`: each shot's statistics come from one streamed pass, every
    layer read from the files already cut to the widths pruned so far (`StreamedModel.widths`), so the
    statistics equal those of the in-memory model narrowed by the same shots.

    Every shot changes every layer it narrows, so each pass starts at layer 0 from the stored embedding
    output (the embedding is read once). Hidden states live in RAM or under `work_dir`."""

    def __init__(self, sm: StreamedModel, calib: CalibrationData, *, batch_size: int = 4,
                 work_dir: str | Path | None = None, keep_weights: bool = False, check_overflow: bool = True,
                 progress: bool = True):
        self.sm = sm
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.streamer = LayerStreamer(sm, calib, batch_size=batch_size, work_dir=self.work_dir,
                                      remember_inputs=False, progress=progress)
        self.keep_weights = keep_weights
        self.check = check_overflow

    def collect(self, *, attn: bool = True, mlp: bool = True, desc: str = "width scoring",
                widths: Any = None) -> dict[int, Any]:
        self.sm.widths = dict(widths or {})
        obs = WidthStatsObserver(attn=attn, mlp=mlp, keep_weights=self.keep_weights).bind(self.sm.adapter)
        observers: list[StreamObserver] = [FiniteCheck(), obs] if self.check else [obs]
        self.streamer.run(observers, start_layer=0, desc=desc)
        return obs.stats

    def cleanup(self) -> None:
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)


# --- streamed saving ---------------------------------------------------------------------------------------------

def _layer_of(name: str, layers_prefix: str) -> tuple[int, str] | None:
    if not name.startswith(layers_prefix):
        return None
    idx, _, rest = name[len(layers_prefix):].partition(".")
    return int(idx), rest


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


def save_pruned_streamed(src: str | Path, plan: PruningPlan, out: str | Path, *, force: bool = False,
                         dtype: str | torch.dtype | None = None, tokenizer: Any = None,
                         max_shard_bytes: int = 1 << 30, progress: bool = True) -> Path:
    """Write the pruned checkpoint of `plan` applied to the local checkpoint `src`, never holding more than
    one layer and one shard in memory. Equal, tensor for tensor and in config.json, to
    `load_model(src, dtype=dtype)` + `surgery.apply_plan` + `checkpoint.save_checkpoint`.

    `dtype`: the dtype of the written weights (what `load_model` would load them as); None keeps the source
    checkpoint's dtype. `tokenizer`: saved alongside; None loads the source's own."""
    from prunekit.surgery import apply_plan, mark_drops, stock_class
    from prunekit.width_surgery import apply_widths

    src_dir = Path(resolve_model_path(src))
    out = prepare_output_dir(out, force)
    if dtype is None:
        dtype = _checkpoint_dtype(src_dir)
    # The pruned structure: the ordinary surgery on a meta skeleton gives the config and the tensor names.
    pruned = StreamedModel(src_dir, dtype=dtype)
    ad = pruned.adapter
    original = {id(layer): i for i, layer in enumerate(ad.layers())}
    structure = apply_plan(ad, plan)
    keep = [original[id(layer)] for layer in ad.layers()]
    # The values: an untouched skeleton whose layers are materialised one at a time and cut the same way.
    source = StreamedModel(src_dir, dtype=dtype)
    sad = source.adapter
    drops_by_layer: dict[int, list[Any]] = defaultdict(list)
    for d in plan.dropped:
        drops_by_layer[d.layer].append(d)

    names = _saved_names(pruned.model)
    meta_sd = pruned.model.state_dict()
    sizes = [(n, meta_sd[n].numel() * meta_sd[n].element_size()) for n in names]
    shards = _plan_shards(sizes, max_shard_bytes)
    layers_prefix = ad.spec.layers + "."

    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(src_dir))
        except Exception as e:
            raise CheckpointError(f"cannot load a tokenizer from {src_dir}: {e}") from e

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    current: dict[str, Any] = {"layer": None, "tensors": {}}

    def layer_tensors(new_idx: int) -> dict[str, torch.Tensor]:
        if current["layer"] == new_idx:
            return current["tensors"]
        current["layer"], current["tensors"] = None, {}
        i = keep[new_idx]
        layer = sad.layers()[i]
        source.materialise(layer, source.layer_prefix(i))
        try:
            if i in plan.widths:
                apply_widths(sad, {i: plan.widths[i]})
            mark_drops(sad, drops_by_layer.get(i, []))
            tensors = {k: v.detach() for k, v in layer.state_dict().items()}
        finally:
            source.release(layer)
        current["layer"], current["tensors"] = new_idx, tensors
        return tensors

    def other_tensor(n: str) -> torch.Tensor:
        name = pruned.source_name(n)
        t = pruned.files.load([name], torch.device("cpu"))[name]
        meta = meta_sd[n]
        return t.to(meta.dtype) if t.is_floating_point() and meta.is_floating_point() else t

    try:
        weight_map: dict[str, str] = {}
        bar = tqdm(shards, desc="writing shards", disable=not progress, leave=False)
        for s, shard in enumerate(bar):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
            # Tensors go to the file one by one as they are produced: memory holds one layer, not a shard.
            specs = [(n, meta_sd[n].dtype, tuple(meta_sd[n].shape)) for n in shard.names]
            with SafetensorsWriter(tmp / fname, specs, metadata={"format": "pt"}) as writer:
                for n in shard.names:
                    where = _layer_of(n, layers_prefix)
                    t = layer_tensors(where[0])[where[1]] if where is not None else other_tensor(n)
                    writer.write(n, t)  # checks name, dtype and shape against the pruned skeleton
                    weight_map[n] = fname
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _save_configs(pruned.model, tmp)
        write_companions(tmp, tokenizer, stock_class(pruned.model).__name__ if structure else None, plan)
        commit_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, so a shard never has to be held in memory.

    The file format is the documented one (little-endian u64 header length, a JSON header with every
    tensor's dtype, shape and byte range, padded with spaces to 8 bytes, then the raw little-endian data).
    The header is written first from the names, dtypes and shapes given up front, which the streamed saver
    knows from the pruned meta skeleton; `write` must then be called for exactly those tensors, in order,
    and raises `CheckpointError` on any mismatch. The file is only complete when the context exits cleanly."""

    def __init__(self, path: str | Path, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        import struct
        import sys

        if sys.byteorder != "little":  # the raw bytes below are written in the machine's order
            raise CheckpointError("streamed saving writes safetensors data as-is and needs a little-endian machine")
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in specs:
            if dtype not in _ST_DTYPES:
                raise CheckpointError(f"cannot write {name!r}: dtype {dtype} has no safetensors name")
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.specs = list(specs)
        self.done = 0
        self.path = Path(path)
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__/close
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.done >= len(self.specs):
            raise CheckpointError(f"internal error: {name} is one tensor more than {self.path.name} announced")
        want, dtype, shape = self.specs[self.done]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            # Would mean that the two surgeries (meta skeleton vs materialised layer) disagree.
            raise CheckpointError(f"internal error: got {name} {tensor.dtype} {tuple(tensor.shape)} where "
                                  f"{want} {dtype} {shape} was expected")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            # A uint8 view of the tensor's memory: written without a copy.
            self.file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.done += 1

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()
        if exc_type is None and self.done != len(self.specs):
            raise CheckpointError(f"internal error: {self.path.name} got {self.done} of {len(self.specs)} tensors")


def _saved_names(model: nn.Module) -> list[str]:
    """The tensor names `save_pretrained` writes: the state dict without tied duplicates. Weight-name
    conversions (which some architectures apply on save) are not supported by the streamed writer."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = model.state_dict()
    kept = remove_tied_weights_from_state_dict(dict(sd), model)
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(model, dict(kept))
        if set(reverted) != set(kept):
            raise CheckpointError(f"{type(model).__name__} renames weights when saving; streamed saving does not "
                                  "support it (save in memory instead)")
    except ImportError:  # older transformers: no conversions
        pass
    return [n for n in sd if n in kept]


def _save_configs(model: nn.Module, directory: Path) -> None:
    """config.json and generation_config.json as `save_pretrained` writes them."""
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate():  # type: ignore[operator]
        model.generation_config.save_pretrained(directory)


def _checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (its config's `dtype`, else its first float tensor)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from e
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    files = CheckpointFiles(path)
    for n, f in files.file_of.items():
        with open_safetensors(path / f) as st:
            t = st.get_slice(n).get_dtype()
        if t in ("F32", "F16", "BF16"):
            return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t]
    return torch.float32
