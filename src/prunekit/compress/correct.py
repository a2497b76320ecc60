"""Error correction, the last step of `compress`: every kept output projection (o_proj / down_proj) of the
chosen model is refitted, layer by layer from the bottom, so that the pruned model's residual stream follows
the dense model's.

The search's own refit makes each cut projection reproduce the output it had in the dense model, from the
dense model's inputs. Once several sub-layers are cut, every layer's input differs from the dense one, and
those errors add up. Here the dense and the pruned model walk the fit part of the calibration data in
lockstep (two runners over the same layer source, one layer at a time: `LayerRunner.step`), and at each
sub-layer, with x the pruned model's input of its output projection, r the pruned residual stream before it
and h the dense residual stream after it, the projection's kept columns are refitted by

    W = argmin sum_t ||W x_t - (h_t - r_t - b)||^2 + lam ||W - W0||^2

(b its bias, W0 its weight so far, lam = `RIDGE` times the mean diagonal of the kept columns' Gram), so each
sub-layer also corrects the error of everything below it. Only float64 [in, in] and [in, d] sums are kept
(streamed-safe; under torchrun each rank sums its share, and the sums are totalled before the solve).
Removed units stay removed: only the kept columns are fitted.

Where a norm follows the projection before the residual add (Gemma 3's post-norms), the sub-layer adds
gain * z / rms(z) with z = W x + b: its output has a fixed size and is not linear in W. There the target is
the dense sub-layer's own output direction z_dense / rms(z_dense), fitted from the pruned inputs with the
current rms held fixed (`_FitSums._normalised`), so such a sub-layer makes up for its cut and its drifted
inputs but does not take on the drift of the residual stream. Cost: four passes of the layers over the fit
part (the dense model once, the pruned model three times: fit the attention, fit the MLP, carry the result
up).

Input maps (`input_ridge`, off by default): before a sub-layer's output projection is refitted, a [d, d] map
M = argmin sum_t ||M x_t - x_dense_t||^2 + lam ||M - I||^2 from the pruned input of its input projections to
the dense one can be merged into them (W -> W M), so that q/k/v (gate/up) read what they read in the dense
model. Two more passes per layer; off by default, because the output refit already absorbs what a linear map
of the input can see.

The ridge is strong (1.0 times the mean Gram diagonal) because a weaker one fits the calibration text rather
than the dense model; the selection runs behind both choices are in docs/decisions.md ("compress").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.compress import postnorm
from prunekit.compress.stats import Sublayer
from prunekit.data import CalibrationData
from prunekit.engine.runner import LayerRunner, Observer, TensorStore, state_key
from prunekit.engine.sources import LayerSource
from prunekit.width.importance import masked_rows

RIDGE = 1.0
# The input maps' ridge, relative to the mean diagonal of the pruned inputs' Gram; None: no input maps (the
# default: they cost two more passes per layer and the held-out check does not improve; docs/decisions.md).
INPUT_RIDGE: float | None = None
PARTS = ("attn", "mlp")


@dataclass
class Correction:
    """What `correct_model` did: the relative residual ||W x - target||^2 / ||target||^2 of every refitted
    sub-layer, before (with W0) and after."""

    ridge: float
    before: dict[Sublayer, float] = field(default_factory=dict)
    after: dict[Sublayer, float] = field(default_factory=dict)
    input_ridge: float | None = None
    inputs_before: dict[Sublayer, float] = field(default_factory=dict)
    inputs_after: dict[Sublayer, float] = field(default_factory=dict)


class _Dense(Observer):
    """Keeps, per batch, the dense model's residual stream between attention and MLP of the current layer, and
    for a sub-layer to refit (in `edits.columns`) whose output is normalised (`edits.norm(layer, part)` not
    None), its output projection's output divided by its rms: the direction the norm passes on, which that
    sub-layer's refit matches; with `inputs` (input maps on), also the input of every such sub-layer's input
    projections."""

    def __init__(self, store: TensorStore, edits: Edits, inputs: Callable[[nn.Module, str], nn.Linear] | None):
        self.store, self.edits, self.inputs = store, edits, inputs
        self.z: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []

    def begin_layer(self, i: int, layer: nn.Module) -> None:
        for part in PARTS:
            if self.inputs is not None and (i, part) in self.edits.columns:
                self.handles.append(self.inputs(layer, part).register_forward_hook(
                    lambda m, args, out, part=part: self.z.__setitem__(f"{part}-in", args[0])))
            norm = self.edits.norm(layer, part)
            if norm is not None and (i, part) in self.edits.columns:
                eps = postnorm.eps(norm)
                self.handles.append(self.edits.proj(layer, part).register_forward_hook(
                    lambda m, args, out, part=part, eps=eps: self.z.__setitem__(part, postnorm.unit(out, eps))))

    def observe(self, i: int, b: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                mask: torch.Tensor | None) -> None:
        self.store.put(f"mid-b{b:06d}", h_mid)
        for part, z in self.z.items():
            self.store.put(f"{part}-b{b:06d}", z)
        self.z = {}

    def end_layer(self, i: int, layer: nn.Module) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class _LeastSquares(Observer):
    """The float64 sums of a least-squares fit X W' ~ T over one pass: Gram X'X, cross X'T and ||T||^2."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.tt = 0.0

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        # Summed where the layer runs (`masked_rows` gave float64 rows); `solved` takes them to the CPU once.
        g, c = x.T @ x, x.T @ t
        self.gram = g if self.gram is None else self.gram + g
        self.cross = c if self.cross is None else self.cross + c
        self.tt += float((t * t).sum())

    def solved(self, w0: torch.Tensor, ridge: float,
               total: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
        """`solve` on the sums totalled over processes."""
        assert self.gram is not None and self.cross is not None
        tt = float(total(torch.tensor([self.tt], dtype=torch.float64))[0])
        return solve(total(self.gram.cpu()), total(self.cross.cpu()), tt, w0, ridge)


class _FitSums(_LeastSquares):
    """During one pass of the pruned model through layer `i`: Gram and cross sums of sub-layer `part`'s output
    projection (its `cols` input columns) against the target (dense residual after it, minus the pruned
    residual before it, minus the projection's bias). Where a norm follows the projection (`norm` gives it),
    the target is the dense output's direction (`direction(b)`) instead, as `_normalised` says."""

    def __init__(self, part: str, proj: Callable[[nn.Module], nn.Linear], cols: torch.Tensor,
                 target: Callable[[int], torch.Tensor], direction: Callable[[int], torch.Tensor],
                 norm: Callable[[nn.Module], nn.Module | None]):
        super().__init__()
        self.part, self.proj, self.cols, self.norm = part, proj, cols, norm
        self.target, self.direction = target, direction
        self.x: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.eps: float | None = None
        self.handle: Any = None

    def begin_layer(self, i: int, layer: nn.Module) -> None:
        proj = self.proj(layer)
        self.bias = None if proj.bias is None else proj.bias.detach().to(torch.float64)
        self.handle = proj.register_forward_hook(lambda m, args, out: self._seen(args[0], out))
        norm = self.norm(layer)
        self.eps = None if norm is None else postnorm.eps(norm)

    def _seen(self, x: torch.Tensor, z: torch.Tensor) -> None:
        self.x, self.z = x, z

    def observe(self, i: int, b: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                mask: torch.Tensor | None) -> None:
        assert self.x is not None and self.z is not None
        x = masked_rows(self.x, mask)[:, self.cols]
        if self.eps is not None:
            x, t = self._normalised(x, masked_rows(self.direction(b).to(x.device), mask), masked_rows(self.z, mask))
        else:
            before = h_in if self.part == "attn" else h_mid
            t = masked_rows(self.target(b).to(before.device), mask) - masked_rows(before, mask)
            if self.bias is not None:
                t = t - self.bias
        self.add(x, t)
        self.x = self.z = None

    def _normalised(self, x: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fit through an RMS norm. The residual stream gets gain * z / r from the projection's output
        z = W x + bias (r = rms(z)): a token's output has a fixed size, only its direction can be steered. The
        target is the dense sub-layer's own direction u = z_dense / r_dense, matched by z / r with r of the
        current weight held fixed (the linearisation): inputs x / r, target u - bias / r. So the sub-layer
        makes up for its cut and its drifted inputs, but not for the drift of the residual stream itself: with
        its output's size fixed it cannot take that on, and asked to (target: the residual difference divided
        by the gains) it made Gemma 3 far worse (check loss 5.01 -> 9.36 at params=0.9)."""
        assert self.eps is not None
        r = postnorm.rms(z, self.eps)
        if self.bias is not None:
            u = u - self.bias / r
        return x / r, u

    def end_layer(self, i: int, layer: nn.Module) -> None:
        self.handle.remove()


class _InputSums(_LeastSquares):
    """During one pass of the pruned model through layer `i`: the Gram of a sub-layer's input (what its input
    projections read, `module` the first of them) and its cross sum with the dense model's (`dense(b)`)."""

    def __init__(self, module: Callable[[nn.Module], nn.Linear], dense: Callable[[int], torch.Tensor]):
        super().__init__()
        self.module, self.dense = module, dense
        self.x: torch.Tensor | None = None
        self.handle: Any = None

    def begin_layer(self, i: int, layer: nn.Module) -> None:
        self.handle = self.module(layer).register_forward_hook(lambda m, args, out: setattr(self, "x", args[0]))

    def observe(self, i: int, b: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                mask: torch.Tensor | None) -> None:
        assert self.x is not None
        self.add(masked_rows(self.x, mask), masked_rows(self.dense(b).to(self.x.device), mask))
        self.x = None

    def end_layer(self, i: int, layer: nn.Module) -> None:
        self.handle.remove()


def solve(gram: torch.Tensor, cross: torch.Tensor, tt: float, w0: torch.Tensor,
          ridge: float) -> tuple[torch.Tensor, float, float]:
    """(new [d, c] weight of the kept columns, relative residual of `w0`, of the new weight): the ridge
    least-squares fit towards `w0` ([d, c]) from the sums of `_FitSums`, solved where the sums are (the CPU)
    and returned on `w0`'s device."""
    dev, w0 = w0.device, w0.to(gram.device)
    lam = ridge * float(torch.diagonal(gram).mean().clamp_min(1e-30))
    eye = torch.eye(len(gram), dtype=gram.dtype)
    w = torch.linalg.solve(gram + lam * eye, cross + lam * w0.T).T

    def residual(v: torch.Tensor) -> float:  # ||X v' - T||^2 / ||T||^2 from the sums
        return float(tt - 2 * (v * cross.T).sum() + (v @ gram * v).sum()) / max(tt, 1e-30)

    return w.to(dev), residual(w0), residual(w)


@dataclass
class Edits:
    """How `correct_model` reads and writes the projections of the model under search: `columns[s]` are the kept
    input columns of every sub-layer to refit (removed ones are absent), `edits[s]` the chosen candidate's
    weights (written before a layer is refitted), `read(s)` / `write(s, weight, removed)` the projection's
    weight through the layer source, `proj(layer, part)` the module, `norm(layer, part)` the norm between it and
    the residual add (None where there is none)."""

    columns: dict[Sublayer, torch.Tensor]
    edits: dict[Sublayer, torch.Tensor]
    read: Callable[[Sublayer], torch.Tensor]
    write: Callable[[Sublayer, torch.Tensor, bool], None]
    proj: Callable[[nn.Module, str], nn.Linear]
    norm: Callable[[nn.Module, str], nn.Module | None]


@torch.no_grad()
def correct_model(source: LayerSource, fit: CalibrationData, edits: Edits, *, ridge: float = RIDGE,
                  input_ridge: float | None = INPUT_RIDGE, batch_size: int = 4,
                  total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                  work_dirs: Callable[[], Path | None] = lambda: None, progress: bool = True) -> Correction:
    """Write the chosen candidate's edits layer by layer, each layer's kept projections refitted as the module
    docstring says. `source` holds the DENSE model when called (nothing written yet); when it returns, every
    edit and refit is written (not committed). `input_ridge`: the input maps' ridge (None: output projections
    only); `total`: the sums over processes; `work_dirs`: a directory for hidden states (None: RAM), called
    once per store."""
    dense = LayerRunner(source, fit, batch_size=batch_size, work_dir=work_dirs(), progress=False)
    pruned = LayerRunner(source, fit, batch_size=batch_size, work_dir=work_dirs(), progress=False)
    mids = TensorStore(work_dirs())
    out = Correction(ridge, input_ridge=input_ridge)
    adapter = source.adapter
    names = {id(module): name for name, module in adapter.model.named_modules()}

    def first_input(layer: nn.Module, part: str) -> nn.Linear:  # what all of a sub-layer's input projections read
        return adapter.input_projections(layer, part)[0]

    for i in tqdm(range(adapter.num_layers), desc="compress error correction", disable=not progress,
                  leave=False):
        dense.step(i, [_Dense(mids, edits, None if input_ridge is None else first_input)])
        for s in ((i, p) for p in PARTS):
            if s in edits.edits:
                edits.write(s, edits.edits[s], s not in edits.columns)
        targets = {"attn": lambda b: mids.get(f"mid-b{b:06d}"),
                   "mlp": lambda b: dense.store.get(state_key(i + 1, b))}
        for part in PARTS:
            if (i, part) in edits.columns:
                if input_ridge is not None:
                    weights = [names[id(p)] + ".weight" for p in adapter.input_projections(adapter.layers()[i], part)]
                    _map_inputs(pruned, source, (i, part), first_input, weights,
                                lambda b, part=part: mids.get(f"{part}-in-b{b:06d}"), input_ridge, total, out)
                _refit(pruned, i, part, edits, targets[part], lambda b, part=part: mids.get(f"{part}-b{b:06d}"),
                       ridge, total, out)
        pruned.step(i, [])
    return out


def _refit(pruned: LayerRunner, i: int, part: str, edits: Edits, target: Callable[[int], torch.Tensor],
           direction: Callable[[int], torch.Tensor], ridge: float, total: Callable[[torch.Tensor], torch.Tensor],
           out: Correction) -> None:
    """One pass of the pruned model through layer `i` for the sums, the solve, and the write."""
    s = (i, part)
    cols = edits.columns[s]
    sums = _FitSums(part, lambda layer: edits.proj(layer, part), cols, target, direction,
                    lambda layer: edits.norm(layer, part))
    pruned.step(i, [sums], last=False)
    weight = edits.read(s)
    w0 = weight.detach().to(torch.float64)
    new_cols, out.before[s], out.after[s] = sums.solved(w0[:, cols], ridge, total)
    new = torch.zeros_like(w0)
    new[:, cols] = new_cols
    edits.write(s, new.to(weight.dtype), False)


def _map_inputs(pruned: LayerRunner, source: LayerSource, s: Sublayer,
                first_input: Callable[[nn.Module, str], nn.Linear], weights: list[str],
                dense: Callable[[int], torch.Tensor], ridge: float, total: Callable[[torch.Tensor], torch.Tensor],
                out: Correction) -> None:
    """The input map of sub-layer `s` (`first_input` gives the first of its input projections):
    M = argmin sum_t ||M x_t - x_dense_t||^2 + lam ||M - I||^2 over the pruned inputs x and the dense ones,
    merged into every input projection (`weights`: their names; W -> W M), so that each reads from the pruned
    stream what it read from the dense one. Done before the output projection's refit, which then sees the
    mapped sub-layer. For a single projection W the same ridge fit of W' x to W x_dense towards W gives exactly
    W M, so one [d, d] solve serves q, k and v (gate and up) alike. One pass of the pruned model through the
    layer for the sums."""
    sums = _InputSums(lambda layer: first_input(layer, s[1]), dense)
    pruned.step(s[0], [sums], last=False)
    assert sums.gram is not None
    eye = torch.eye(len(sums.gram), dtype=torch.float64)
    m, out.inputs_before[s], out.inputs_after[s] = sums.solved(eye, ridge, total)
    for name in weights:
        w = source.read(name)
        source.write(name, (w.detach().to(torch.float64) @ m.to(w.device)).to(w.dtype))
