"""The one runner: calibration batches through a model's decoder layers, layer by layer, with observers.

Layer-major order. Every batch goes through layer 0, then every batch through layer 1, and so on; the
hidden states at the current layer boundary are kept in a `TensorStore` (RAM, or files under `work_dir`).
This order is what lets a streamed source hold one layer at a time; for a resident source it computes
exactly the same numbers as a full forward (same modules, same inputs, same call arguments), so one
runner serves both, in one process or under torchrun (the jobs all-reduce what observers accumulate).

Observers (`Observer`) are told about every (layer, batch): the layer's input, the residual stream between
its attention and MLP sub-layers (the input of the adapter's `mid_residual` module), and its output. The
LLM-Drop similarity sums and the TransAct width statistics are observers; nothing else knows the order.

Gradients. `backward` carries a loss's gradient (taken at the last layer's output during a `run`, see
`engine.head`) down the layers, re-running each from its remembered input with autograd on: one layer's
graph at a time, so it works on streamed layers too (`compress` takes its Fishers this way).

Re-runs. After a change at layer j (iterative dropping), `run(start_layer=j)` re-runs layers j.. from the
remembered inputs of the nearest kept layer at or below j. Which layer inputs are kept is bounded by
`state_budget_bytes` (every k-th layer); layer 0's input is always kept, so a re-run never re-embeds.
With a `work_dir`, an interrupted run can continue at a layer whose stored inputs are complete
(`resume_at`).

Steps. A caller that must act between layers (several passes over one layer, each after a weight edit; two
runners walking the same layers in lockstep, as `compress`'s error correction does) calls `step(i)` for
i = 0, 1, ... instead of `run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.data import CalibrationData
from prunekit.engine.sources import LayerCall, LayerSource
from prunekit.errors import ActivationOverflowError
from prunekit.faults import pause_point
from prunekit.io.outputs import owned_file


class Observer:
    """Told about every (layer, batch) of a run. Override what you need.

    `begin_layer` runs once the layer has its weights (register hooks on its sub-modules there, e.g. the
    inputs of `o_proj` / `down_proj` for width importances), `observe` after each batch went through it,
    `end_layer` before it is released."""

    def begin_layer(self, i: int, layer: nn.Module) -> None:
        pass

    def begin_batch(self, i: int, b: int, mask: torch.Tensor | None) -> None:
        """Before batch `b` goes through layer `i` (module hooks learn which tokens are padding here)."""

    def observe(self, i: int, b: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                mask: torch.Tensor | None) -> None:
        pass

    def end_layer(self, i: int, layer: nn.Module) -> None:
        pass


def check_finite(h: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(h).all()):
        raise ActivationOverflowError(
            f"{where} produced inf/NaN hidden states in {str(h.dtype).removeprefix('torch.')} (values beyond the "
            "dtype's range); score in bfloat16 or float32 (--dtype bfloat16 / float32) instead")


class FiniteCheck(Observer):
    """Raises `ActivationOverflowError` when a layer's output holds inf/NaN (half precision overflow)."""

    def observe(self, i: int, b: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                mask: torch.Tensor | None) -> None:
        check_finite(h_out, f"layer {i}")


class TensorStore:
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
        t = t.detach()
        if self.dir is None:
            self.mem[key] = t
            return
        with owned_file(self._file(key)) as tmp:
            torch.save(t.to("cpu").contiguous(), tmp)

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


def state_key(layer: int, batch: int) -> str:
    """Store key of the hidden states entering `layer` for `batch`."""
    return f"h{layer:05d}-b{batch:06d}"


def _tensor_bytes(calls: dict[int, LayerCall]) -> int:
    """Bytes of the distinct tensors in recorded calls (layers share their masks and rotary tables)."""
    seen: dict[int, int] = {}

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            seen[x.data_ptr()] = x.numel() * x.element_size()
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)

    for args, kwargs in calls.values():
        visit(list(args) + list(kwargs.values()))
    return sum(seen.values())


class LayerRunner:
    """Runs calibration data through a `LayerSource` layer by layer, calling observers (see module docstring).

    `remember_inputs`: keep the inputs of every k-th layer (within `state_budget_bytes`) for partial re-runs.
    `calls_budget_bytes`: how much memory may hold the recorded layer calls of all batches (masks, rotary
    tables) so they are computed once per run rather than once per layer; beyond it they are re-recorded."""

    def __init__(self, source: LayerSource, calib: CalibrationData, *, batch_size: int = 4,
                 work_dir: Path | None = None, remember_inputs: bool = False, state_budget_bytes: int = 2 << 30,
                 calls_budget_bytes: int = 256 << 20, progress: bool = True):
        self.source = source
        self.calib = calib
        self.batches = calib.batches(batch_size)
        self.store = TensorStore(work_dir)
        self.progress = progress
        self.calls_budget_bytes = calls_budget_bytes
        n_layers = source.adapter.num_layers
        per_layer = calib.input_ids.numel() * source.adapter.hidden_size * source.dtype.itemsize
        stride = max(1, -(-per_layer * n_layers // max(state_budget_bytes, 1)))
        self.kept_layers: set[int] = {0}
        if remember_inputs and per_layer <= state_budget_bytes:
            self.kept_layers = set(range(0, n_layers, stride))
        # Boundaries whose states in the store are valid for the model as it is now.
        self.valid: set[int] = set()
        self._step_calls: _CallCache | None = None

    def restart_layer(self, start_layer: int) -> int:
        """The layer a run asked to start at `start_layer` really starts at (0 = from the token ids)."""
        return max((k for k in self.valid if k <= start_layer), default=0)

    def invalidate_from(self, layer: int) -> None:
        """Forget the stored states past `layer` (the model changed at `layer`, e.g. a trial removal)."""
        self.valid = {k for k in self.valid if k <= layer}

    def resume_at(self, layer: int) -> bool:
        """Trust the stored inputs of `layer` (left by an interrupted run with the same work dir)."""
        if all(self.store.has(state_key(layer, b)) for b in range(len(self.batches))):
            self.valid = {layer}
            return True
        return False

    @torch.no_grad()
    def run(self, observers: Sequence[Observer], *, start_layer: int = 0,
            on_layer_done: Callable[[int], None] | None = None, desc: str = "calibration") -> int:
        """Run every batch through layers `restart_layer(start_layer)`.. (the caller guarantees that no layer
        below `start_layer` changed since the states were computed); returns the layer it started at."""
        src = self.source
        n_layers = src.adapter.num_layers
        start = self.restart_layer(start_layer)
        if start == 0 and 0 not in self.valid:
            self._embed_all()
        self.valid = {k for k in self.valid if k <= start}  # states past the start are about to be recomputed
        calls = _CallCache(src, self.batches, self.calls_budget_bytes)
        for i in tqdm(range(start, n_layers), desc=desc, disable=not self.progress, leave=False):
            self._run_layer(i, observers, calls)
            self.valid.add(i + 1)
            if i not in self.kept_layers:
                self._forget(i)
            if on_layer_done is not None:
                on_layer_done(i)
            pause_point("scoring")
        self._forget(n_layers)  # the last layer's output is only needed by the observers
        return start

    @torch.no_grad()
    def step(self, i: int, observers: Sequence[Observer], *, last: bool = True) -> None:
        """Every batch through layer `i` alone, from its stored inputs to those of layer `i + 1` (layer 0's are
        computed on the first step). Step the layers in order; a layer may be stepped again (`last=False`
        keeps its inputs for that; the last step of a layer releases them unless they are remembered), and
        each step reads the layer's weights as they are then."""
        if i not in self.valid:
            if i != 0:
                raise ValueError(f"layer {i}'s inputs are not stored: step the layers in order")
            self._embed_all()
        if self._step_calls is None:
            self._step_calls = _CallCache(self.source, self.batches, self.calls_budget_bytes)
        self._run_layer(i, observers, self._step_calls)
        self.valid.add(i + 1)
        if last and i not in self.kept_layers:
            self._forget(i)

    def _forget(self, layer: int) -> None:
        """Delete the stored inputs of `layer` for every batch."""
        for b in range(len(self.batches)):
            self.store.delete(state_key(layer, b))
        self.valid.discard(layer)

    def _run_layer(self, i: int, observers: Sequence[Observer], calls: "_CallCache") -> None:
        src, store = self.source, self.store
        mid: dict[str, torch.Tensor] = {}

        def pre_mid(module: nn.Module, args: tuple[Any, ...]) -> None:
            mid["h"] = args[0]  # the residual stream between the attention and the MLP

        with src.layer(i) as layer:
            handle = src.adapter.mid_residual_module(layer).register_forward_pre_hook(pre_mid)
            try:
                for obs in observers:
                    obs.begin_layer(i, layer)
                for b, (_, mask) in enumerate(self.batches):
                    args, kwargs = calls.get(b)[i]
                    h_in = store.get(state_key(i, b), src.device)
                    mask_dev = mask.to(src.device)
                    for obs in observers:
                        obs.begin_batch(i, b, mask_dev)
                    h_out = _output(layer(h_in, *args, **kwargs))
                    for obs in observers:
                        obs.observe(i, b, h_in, mid["h"], h_out, mask_dev)
                    store.put(state_key(i + 1, b), h_out)
                for obs in observers:
                    obs.end_layer(i, layer)
            finally:
                handle.remove()

    def backward(self, top: dict[int, torch.Tensor], observers: Sequence[Observer], *,
                 desc: str = "backward") -> dict[int, torch.Tensor]:
        """Carry gradients down the layers: `top[b]` is the gradient of some loss with respect to the last
        layer's output for batch `b` (`engine.head.LossGradient` gives it during `run`); returns the gradients
        with respect to layer 0's input. Each layer is re-run from its remembered input with autograd on and
        differentiated with respect to that input only (no weight gets a gradient), one layer and one batch at
        a time, so memory holds one layer's graph. Observers see the re-run forward (module hooks registered
        in `begin_layer`, which may register tensor hooks on outputs to see their gradients) and
        `observe(i, b, h_in, h_in, h_out, mask)` after each batch's backward. Needs every layer's input
        remembered by the last `run` (`remember_inputs` with a budget for all of them)."""
        n_layers = self.source.adapter.num_layers
        if any(i not in self.valid for i in range(n_layers)):
            raise ValueError("backward needs every layer's input remembered: a runner with remember_inputs and a "
                             "state budget for all of them, after a run")
        grads = dict(top)
        calls = _CallCache(self.source, self.batches, self.calls_budget_bytes)
        for i in tqdm(reversed(range(n_layers)), total=n_layers, desc=desc, disable=not self.progress,
                      leave=False):
            grads = self._backward_layer(i, grads, observers, calls)
            pause_point("scoring")
        return grads

    def _backward_layer(self, i: int, grads: dict[int, torch.Tensor], observers: Sequence[Observer],
                        calls: "_CallCache") -> dict[int, torch.Tensor]:
        src = self.source
        out: dict[int, torch.Tensor] = {}
        with src.layer(i) as layer:
            for obs in observers:
                obs.begin_layer(i, layer)
            for b, (_, mask) in enumerate(self.batches):
                args, kwargs = calls.get(b)[i]
                # detach: a stored state must not itself start requiring gradients.
                h_in = self.store.get(state_key(i, b), src.device).detach().requires_grad_(True)
                mask_dev = mask.to(src.device)
                for obs in observers:
                    obs.begin_batch(i, b, mask_dev)
                with torch.enable_grad():
                    h_out = _output(layer(h_in, *args, **kwargs))
                    (out[b],) = torch.autograd.grad(h_out, h_in, grad_outputs=grads[b].to(h_out.device))
                for obs in observers:
                    obs.observe(i, b, h_in.detach(), h_in.detach(), h_out.detach(), mask_dev)
            for obs in observers:
                obs.end_layer(i, layer)
        return out

    def _embed_all(self) -> None:
        """Layer-0 inputs of every batch, computed by the model's own forward with the embedding loaded."""
        with self.source.embedding():
            for b, (ids, mask) in enumerate(self.batches):
                h0, _ = self.source.capture(ids, mask, embed=True)
                assert h0 is not None
                check_finite(h0, "the embedding")
                self.store.put(state_key(0, b), h0)
        self.valid.add(0)


def _output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states (some return a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class _CallCache:
    """The recorded layer calls of each batch for one run, kept while they fit in the budget."""

    def __init__(self, source: LayerSource, batches: list[tuple[torch.Tensor, torch.Tensor]], budget: int):
        self.source = source
        self.batches = batches
        self.budget = budget
        self.kept: dict[int, dict[int, LayerCall]] = {}
        self.used = 0

    def get(self, b: int) -> dict[int, LayerCall]:
        if b in self.kept:
            return self.kept[b]
        ids, mask = self.batches[b]
        _, calls = self.source.capture(ids, mask)
        size = _tensor_bytes(calls)
        if self.used + size <= self.budget:
            self.kept[b] = calls
            self.used += size
        return calls
