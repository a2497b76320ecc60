"""The statistics `compress` allocates by, from one forward and backward pass over the calibration tokens.

For every present sub-layer, with x_t the input of its output projection (o_proj / down_proj) at token t and
g_t the gradient of the summed calibration loss with respect to that projection's output:

* G = sum_t x_t x_t'  (input Gram; [in, in]): what a least-squares refit of the projection needs, and the
  TransAct activation norms (its diagonal);
* F = sum_t g_t g_t'  (output Fisher; [d, d]): how much the loss cares about an error in the projection's
  output, direction by direction.

Where the projection's output passes through an RMS norm before the residual add (Gemma 3), g_t is taken
with the norm's rms held fixed (`postnorm`): the true gradient there is orthogonal to each token's own
output (the norm undoes a change of size), the same linearisation as the error correction's. Without it the
estimate would price a change of the output's size that the norm removes.

A sub-layer without an output projection (a block of experts, `ModelAdapter.has_output_projection`) is seen
through the identity map of its output: x_t is then the block's output itself, G its [d, d] Gram, and the
only cut `compress` makes there is the whole block's removal, priced tr(F G) (`curves`).

Under the Kronecker (K-FAC) approximation E[(g'Rx)^2] ~ tr(F R G R') / T, the loss increase of replacing the
projection's weight W by W + R is about tr(F R G R') / (2T): one number per candidate that compares sub-layers
of different depths and kinds on the same scale, which cosine similarities and activation norms cannot.

Computed over the one runner, so on resident and streamed layers alike: a forward `run` remembers every
layer's input and takes the loss's gradient at the last layer's output (`engine.head.LossGradient`), then
`LayerRunner.backward` re-runs the layers from the top down with autograd on, and hooks on each layer's
output projections fold in its Grams (on the re-run forward) and Fishers (on the backward). Memory holds one
layer's graph, and one layer's Grams at a time when they are written to disk (at 1.5B parameters the 28 MLP
Grams are 18 GiB together). The sums are float64 (each batch's product is taken in the model's dtype, then
accumulated), and padding tokens are excluded. Cost: about four forward passes (forward, re-run, backward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.compress import postnorm
from prunekit.data import CalibrationData
from prunekit.engine.head import LossGradient
from prunekit.engine.runner import FiniteCheck, LayerRunner, Observer
from prunekit.engine.sources import LayerSource, as_source
from prunekit.engine.sums import CONSTANT
from prunekit.width.importance import masked_rows

Sublayer = tuple[int, str]  # (layer index, "attn" | "mlp")


@dataclass
class SublayerStats:
    gram: torch.Tensor | None  # [in, in] float64; None while it lies in `gram_file` (`CompressStats.layer`)
    fisher: torch.Tensor  # [d, d] float64
    tokens: int = 0
    gram_file: Path | None = None


@dataclass
class CompressStats:
    layers: dict[Sublayer, SublayerStats] = field(default_factory=dict)
    loss: float = 0.0  # mean calibration NLL of the model the statistics were taken on
    tokens: int = 0
    grams_on_disk: bool = False  # each layer's Grams were written to disk once summed (`collect_stats`)

    def layer(self, key: Sublayer) -> SublayerStats:
        """`layers[key]` with its Gram in memory: read from disk for this one use when it was spilled."""
        st = self.layers[key]
        if st.gram is not None:
            return st
        assert st.gram_file is not None
        return SublayerStats(torch.load(st.gram_file, weights_only=True), st.fisher, st.tokens)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The sums by name (`engine.sums.Summable`): "<layer>.<part>.gram|fisher|tokens", the token count and
        the mean loss (as it is: a mean is not summed). Spilled Grams are read back, so this is for statistics
        that fit in memory."""
        out = {f"{CONSTANT}loss": torch.tensor([self.loss], dtype=torch.float64),
               "tokens": torch.tensor([float(self.tokens)], dtype=torch.float64)}
        for (i, part) in sorted(self.layers):
            st = self.layer((i, part))
            assert st.gram is not None
            out[f"{i}.{part}.gram"], out[f"{i}.{part}.fisher"] = st.gram, st.fisher
            out[f"{i}.{part}.tokens"] = torch.tensor([float(st.tokens)], dtype=torch.float64)
        return {k: v.detach().to("cpu", torch.float64).contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "CompressStats":
        tokens = int(tensors["tokens"][0])
        stats = cls(loss=float(tensors[f"{CONSTANT}loss"][0]), tokens=tokens)
        for name in sorted(tensors):
            if name.endswith(".gram"):
                i, part, _ = name.split(".")
                stats.layers[(int(i), part)] = SublayerStats(tensors[name], tensors[f"{i}.{part}.fisher"],
                                                             int(tensors[f"{i}.{part}.tokens"][0]))
        return stats

    def release(self) -> None:
        """Forget every sum and delete the spilled Grams (a later round's statistics replace these)."""
        for st in self.layers.values():
            if st.gram_file is not None:
                st.gram_file.unlink(missing_ok=True)
        self.layers.clear()


class StatsStore(Protocol):
    """Where finished statistics passes are kept between runs (`jobs.cache.PassCache`): `step` names the
    pass within one search (the model it was taken on follows from the search's options and the step)."""

    def get(self, step: str) -> CompressStats | None: ...

    def put(self, step: str, stats: CompressStats) -> None: ...


def _outer(rows: torch.Tensor) -> torch.Tensor:
    # In at least float32: a Gram rounded to bfloat16 is not positive definite (its Cholesky fails).
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    return (rows.T @ rows).to(torch.float64)


def stat_shapes(adapter: ModelAdapter) -> dict[Sublayer, tuple[int, int]]:
    """(Gram width, Fisher width) of every present sub-layer: its output projection's input and output widths,
    or the hidden size twice where its statistics are taken at its output (a block of experts)."""
    out: dict[Sublayer, tuple[int, int]] = {}
    for i, layer in enumerate(adapter.layers()):
        for part, present in (("attn", adapter.has_attention(layer)), ("mlp", adapter.has_mlp(layer))):
            if not present:
                continue
            if adapter.has_output_projection(layer, part):
                proj = adapter.output_projection(layer, part)
                out[(i, part)] = (proj.in_features, proj.out_features)
            else:
                out[(i, part)] = (adapter.hidden_size, adapter.hidden_size)
    return out


def output_projections(adapter: ModelAdapter) -> dict[Sublayer, nn.Linear]:
    """The output projection (o_proj / down_proj) of every present sub-layer, in sorted key order."""
    out: dict[Sublayer, nn.Linear] = {}
    for i, layer in enumerate(adapter.layers()):
        for part, present in (("attn", adapter.has_attention(layer)), ("mlp", adapter.has_mlp(layer))):
            if present:
                out[(i, part)] = adapter.output_projection(layer, part)
    return out


class _StatsObserver(Observer):
    """Folds in each layer's Grams and Fishers during `LayerRunner.backward`; when the layer is done, sums them
    over processes (`total`, in sorted order, the same on every rank) and writes the Grams to `spill` if
    given."""

    def __init__(self, adapter: ModelAdapter, stats: CompressStats, total: Callable[[torch.Tensor], torch.Tensor],
                 spill: Path | None):
        self.adapter = adapter
        self.stats = stats
        self.total = total
        self.spill = spill
        self.mask: torch.Tensor | None = None
        self.handles: list[Any] = []
        self.keys: list[Sublayer] = []

    def begin_layer(self, i: int, layer: nn.Module) -> None:
        self.keys = []
        for part, present in (("attn", self.adapter.has_attention(layer)), ("mlp", self.adapter.has_mlp(layer))):
            if not present:
                continue
            key = (i, part)
            if not self.adapter.has_output_projection(layer, part):
                self._block(key, self.adapter.mlp(layer))
                continue
            proj = self.adapter.output_projection(layer, part)
            # Summed where the layer runs, and moved to the CPU once per layer (`end_layer`), not per batch.
            dev = proj.weight.device
            self.stats.layers[key] = SublayerStats(
                torch.zeros(proj.in_features, proj.in_features, dtype=torch.float64, device=dev),
                torch.zeros(proj.out_features, proj.out_features, dtype=torch.float64, device=dev))
            st = self.stats.layers[key]
            norm = self.adapter.output_norm(layer, part)
            self.handles.append(proj.register_forward_hook(self._hook(st, fisher=norm is None)))
            if norm is not None:
                self.handles.append(norm.register_forward_hook(self._norm_hook(st, norm, proj.out_features)))
            self.keys.append(key)

    def _block(self, key: Sublayer, block: nn.Module) -> None:
        """Statistics taken at a block's output (no output projection, no output norm in these families): its
        output's Gram and the Fisher there."""
        d, dev = self.adapter.hidden_size, next(block.parameters()).device
        st = SublayerStats(torch.zeros(d, d, dtype=torch.float64, device=dev),
                           torch.zeros(d, d, dtype=torch.float64, device=dev))
        self.stats.layers[key] = st
        at_output = self._hook(st, fisher=True)

        def forward(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            y = self.adapter.mlp_output(out)
            at_output(module, (y,), y)

        self.handles.append(block.register_forward_hook(forward))
        self.keys.append(key)

    def begin_batch(self, i: int, b: int, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def _hook(self, st: SublayerStats, fisher: bool) -> Any:
        def forward(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            mask = self.mask
            rows = masked_rows(args[0].detach(), mask).to(args[0].dtype)
            st.gram += _outer(rows)  # type: ignore[operator]
            st.tokens += int(rows.shape[0])

            def backward(grad: torch.Tensor) -> None:
                st.fisher += _outer(masked_rows(grad, mask).to(grad.dtype))

            if fisher and out.requires_grad:
                out.register_hook(backward)
        return forward

    def _norm_hook(self, st: SublayerStats, norm: nn.Module, width: int) -> Any:
        """The Fisher of a post-normed sub-layer: the gradient at the projection's output z with the norm's rms
        held fixed, s / r(z) times the gradient at the norm's output (`postnorm`). The true gradient at z is
        blind to a token's change along its own z (the norm undoes a change of size); with r fixed, dropping
        the sub-layer (z -> 0) is priced as losing its whole output."""
        scale = postnorm.gains(norm, width)

        def forward(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            mask = self.mask
            z = args[0].detach()
            r = postnorm.rms(z.to(torch.promote_types(z.dtype, torch.float32)), postnorm.eps(norm))

            def backward(grad: torch.Tensor) -> None:
                g = grad.to(r.dtype) * scale.to(grad.device) / r
                st.fisher += _outer(masked_rows(g, mask).to(grad.dtype))

            if out.requires_grad:
                out.register_hook(backward)
        return forward

    def end_layer(self, i: int, layer: nn.Module) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for key in sorted(self.keys):
            st = self.stats.layers[key]
            assert st.gram is not None
            st.gram, st.fisher = self.total(st.gram.cpu()), self.total(st.fisher.cpu())
            st.tokens = int(self.total(torch.tensor([float(st.tokens)], dtype=torch.float64))[0])
            if self.spill is not None:
                st.gram_file = self.spill / f"gram-{key[0]:05d}-{key[1]}.pt"
                torch.save(st.gram, st.gram_file)
                st.gram = None


def _same(values: torch.Tensor) -> torch.Tensor:
    return values


def grams_bytes(adapter: ModelAdapter) -> int:
    """Bytes of every present sub-layer's float64 input Gram together."""
    return sum(8 * n_in ** 2 for n_in, _ in stat_shapes(adapter).values())


def collect_stats(model: nn.Module | LayerSource, calib: CalibrationData, *, adapter: ModelAdapter | None = None,
                  batch_size: int = 4, progress: bool = True, desc: str = "compress statistics",
                  total: Callable[[torch.Tensor], torch.Tensor] = _same, gram_budget_bytes: int | None = None,
                  spill_dir: Path | None = None, work_dir: Path | None = None) -> CompressStats:
    """Gram and Fisher of every present sub-layer of `model` (a model in memory or any layer source; see the
    module docstring). `total` turns this process's float64 sums into the sums over every process (under
    torchrun each rank passes its own share of the batches and an all-reduce); in one process it is the
    identity. The sums do not depend on `batch_size` (a token's gradient depends only on its own sequence)
    up to float rounding.

    `gram_budget_bytes`: when all the Grams together would not fit in it, each layer's are written to
    `spill_dir` as soon as they are summed, so memory holds one layer's at a time; `CompressStats.layer`
    reads a spilled Gram back when it is used. The same budget must be given on every rank. `work_dir`:
    where the remembered layer inputs live (default RAM)."""
    source = as_source(model, adapter)
    ad = source.adapter
    spill = None
    if gram_budget_bytes is not None and grams_bytes(ad) > gram_budget_bytes:
        if spill_dir is None:
            raise ValueError("the Grams need more than gram_budget_bytes: give a spill_dir to write them to")
        spill = spill_dir
    runner = LayerRunner(source, calib, batch_size=batch_size, work_dir=work_dir, remember_inputs=True,
                         state_budget_bytes=1 << 62, progress=progress)
    head = LossGradient(source, runner.batches)
    runner.run([FiniteCheck(), head], desc=desc)
    stats = CompressStats(grams_on_disk=spill is not None)
    runner.backward(head.grads, [_StatsObserver(ad, stats, total, spill)], desc=f"{desc}, backward")
    loss = total(head.sums)
    stats.loss, stats.tokens = float(loss[0]) / max(float(loss[1]), 1.0), int(loss[1])
    return stats
