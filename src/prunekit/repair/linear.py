"""Training-free linear repair after dropping (ReplaceMe / LinearPatch style): what a removed span of
sub-layers added to the residual stream is approximated by a linear map of the output of the sub-layer
just before the span (its *carrier*), and the map is folded into the carrier's output projection, so the
architecture, config and parameter count are exactly those of the unrepaired plan.

For a maximal run of removed sub-layers (in the order attn 0, MLP 0, attn 1, ...), with R the residual
before the carrier, C its output and H the residual after the removed span in the DENSE model, the map is

    T = argmin ||C T - (H - R)||^2 + ridge * ||T - I||^2   =   (C'C + ridge I)^-1 (C'(H - R) + ridge I)

(regularised towards the identity, i.e. towards "no repair"). C'C and C'(H - R) are d x d float64 sums
accumulated by an observer of the one runner, so the statistics are streamed-safe; C and R of a span
whose end lies in a later layer wait in the runner's store (RAM or its work directory), as the pairwise
similarity rows do. The projection W (out = x W' + b) becomes T'W and b becomes bT.

Each span's map is kept only if it lowers the causal-LM loss on held-out calibration samples (the last
quarter of the calibration batches, never used to fit), else skipped; the plan records the fit residual
and both losses for every span. A Mixture-of-Experts block's output is the router-weighted sum of its experts'
outputs, each linear in its down tensor and bias, and the router reads only the block's input: the map folds
into every expert (and a shared expert) exactly (`ModelAdapter.residual_outputs`).

The held-out check runs on the same runner over the pruned model, remembering
every layer's input, so trying the map of a span whose carrier is layer j re-runs only layers j.. ; the
fold is written through the layer source, so a layer-streamed model is repaired too (its folded
projections are kept beside the files and written into the saved checkpoint). Architectures whose sub-layer outputs pass through a norm before the
residual add (Gemma 3) cannot take the fold and are refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.data import CalibrationData
from prunekit.engine.head import HeldOutCheck
from prunekit.engine.runner import LayerRunner, Observer, TensorStore
from prunekit.engine.sources import LayerSource, as_source
from prunekit.errors import PlanError
from prunekit.losses import split_check
from prunekit.plans import PruningPlan
from prunekit.width.importance import masked_rows

SubLayer = tuple[int, str]  # (original layer index, "attn" | "mlp")
REPAIRS: tuple[str, ...] = ("none", "linear")


@dataclass
class Span:
    """A maximal run of removed sub-layers and the kept sub-layer just before it."""

    carrier: SubLayer
    removed: list[SubLayer]

    @property
    def end(self) -> SubLayer:
        return self.removed[-1]


def removed_spans(plan: PruningPlan, num_layers: int) -> list[Span]:
    """The plan's removed sub-layers grouped into maximal runs, each with its carrier (runs that start at the
    very first sub-layer have none and are left out)."""
    attn, mlp = plan.drops_by_module()
    order = [(i, part) for i in range(num_layers) for part in ("attn", "mlp")]
    gone = {(i, "attn") for i in attn} | {(i, "mlp") for i in mlp}
    spans: list[Span] = []
    for k, sub in enumerate(order):
        if sub not in gone:
            continue
        before = order[k - 1] if k else None
        if before is None or (before in gone and not (spans and spans[-1].end == before)):
            continue  # part of the run that starts the model: no sub-layer before it to carry a map
        if before in gone:
            spans[-1].removed.append(sub)
        else:
            spans.append(Span(carrier=before, removed=[sub]))
    return spans


def _before_after(part: str, h_in: torch.Tensor, h_mid: torch.Tensor,
                  h_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (h_in, h_mid) if part == "attn" else (h_mid, h_out)


class RepairStats(Observer):
    """C'C and C'(H - R) per span, from the dense model's pass (see the module docstring)."""

    def __init__(self, spans: list[Span], hidden: int, store: TensorStore):
        self.spans = spans
        self.store = store
        self.cc = [torch.zeros(hidden, hidden, dtype=torch.float64) for _ in spans]
        self.cd = [torch.zeros(hidden, hidden, dtype=torch.float64) for _ in spans]
        self.dd = [0.0 for _ in spans]

    def observe(self, i: int, b: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                mask: torch.Tensor | None) -> None:
        for s, span in enumerate(self.spans):
            if span.carrier[0] == i:
                before, after = _before_after(span.carrier[1], h_in, h_mid, h_out)
                self.store.put(f"repair{s}-c-b{b}", masked_rows(after - before, mask))
                self.store.put(f"repair{s}-r-b{b}", masked_rows(before, mask))
            if span.end[0] == i:
                # Summed where the layers run (no copy of every batch's states to the CPU); `fit_map` solves
                # on the CPU.
                c = self.store.get(f"repair{s}-c-b{b}").to(h_in.device)
                d = masked_rows(_before_after(span.end[1], h_in, h_mid, h_out)[1], mask) - \
                    self.store.get(f"repair{s}-r-b{b}").to(c.device)
                self.cc[s], self.cd[s] = self.cc[s].to(c.device), self.cd[s].to(c.device)
                self.cc[s] += c.T @ c
                self.cd[s] += c.T @ d
                self.dd[s] += float((d * d).sum())
                self.store.delete(f"repair{s}-c-b{b}")
                self.store.delete(f"repair{s}-r-b{b}")


def fit_map(cc: torch.Tensor, cd: torch.Tensor, dd: float, ridge: float) -> tuple[torch.Tensor, float]:
    """(T, relative residual ||C T - D||^2 / ||D||^2) of the ridge-to-identity least squares."""
    cc, cd = cc.cpu(), cd.cpu()
    n = cc.shape[0]
    lam = ridge * float(torch.diagonal(cc).mean())  # scale-free: relative to the carrier's energy
    eye = torch.eye(n, dtype=torch.float64)
    t = torch.linalg.solve(cc + lam * eye, cd + lam * eye)
    resid = dd - 2 * float((t * cd).sum()) + float((t * (cc @ t)).sum())
    return t, resid / max(dd, 1e-300)


def folded(tensor: torch.Tensor, t: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """`tensor` with the map `t` applied after it along the residual `axis`: a projection out = x W' + b
    becomes W -> T'W, b -> bT (axis 0), an expert tensor the same per expert (computed in float64, returned in
    the tensor's dtype)."""
    t = t.to(tensor.device, torch.float64)
    moved = torch.movedim(tensor.to(torch.float64), axis, -1) @ t
    return torch.movedim(moved, -1, axis).to(tensor.dtype)


def check_repairable(adapter: ModelAdapter) -> None:
    if adapter.spec.output_norms:
        raise PlanError(f"linear repair folds a map into a sub-layer's output projection, but "
                        f"{adapter.model.config.model_type} normalises sub-layer outputs before the residual add "
                        "(the fold would not be linear); use --repair none")


def linear_repair(dense: nn.Module | LayerSource, pruned: nn.Module | LayerSource, plan: PruningPlan,
                  calib: CalibrationData, *, ridge: float = 1e-2, batch_size: int = 4, work_dir: Path | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Estimate the maps on `dense` (left untouched), fold the helpful ones into `pruned` (a model or layer
    source carrying `plan`: compacted as `apply_plan` leaves a model, or with its layers kept and the drops
    marked, as a streamed view of the checkpoint), and return the record that goes into `plan.repair`.
    Folded weights go through `pruned`'s `write`/`commit` (a streamed source keeps them as overrides, which
    `prunekit.save` writes). Both passes run on the one layer runner, so either model may be streamed."""
    dense_src, pruned_src = as_source(dense), as_source(pruned)
    check_repairable(dense_src.adapter)
    spans = removed_spans(plan, dense_src.adapter.num_layers)
    fit, check = split_check(calib, "linear repair")
    runner = LayerRunner(dense_src, fit, batch_size=batch_size, work_dir=work_dir, progress=progress)
    stats = RepairStats(spans, dense_src.adapter.hidden_size, runner.store)
    runner.run([stats], desc="repair statistics")
    layer_of = _pruned_index(plan, dense_src.adapter.num_layers, pruned_src.adapter.num_layers)
    loss_of = _CheckLoss(pruned_src, check, batch_size, work_dir)
    loss = baseline = loss_of(0)
    records = []
    for s, span in enumerate(spans):
        t, resid = fit_map(stats.cc[s], stats.cd[s], stats.dd[s], ridge)
        layer = layer_of(span.carrier[0])
        _write_fold(pruned_src, layer, span.carrier[1], t)
        after = loss_of(layer)
        applied = after < loss
        if applied:
            loss = after
            pruned_src.commit()
        else:  # never make the plan worse on held-out samples
            pruned_src.revert()
            loss_of.changed(layer)
        records.append({"carrier": {"layer": span.carrier[0], "module": span.carrier[1]},
                        "removed": [{"layer": i, "module": m} for i, m in span.removed],
                        "relative_residual": resid, "check_loss_after": after, "applied": applied})
    return {"method": "linear (ridge to identity, folded into the carrier's output projection)", "ridge": ridge,
            "fit_samples": int(len(fit.input_ids)), "check_samples": int(len(check.input_ids)),
            "check_loss_unrepaired": baseline, "check_loss": loss, "spans": records}


def _pruned_index(plan: PruningPlan, dense_layers: int, pruned_layers: int) -> Callable[[int], int]:
    """Original layer index -> the pruned model's: the same when its layers were kept, else the position among
    the layers that compaction kept (those not emptied by the drops)."""
    if pruned_layers == dense_layers:
        return lambda i: i
    attn, mlp = plan.drops_by_module()
    kept = [i for i in range(dense_layers) if not (i in attn and i in mlp)]
    return kept.index


def _write_fold(source: LayerSource, layer: int, part: str, t: torch.Tensor) -> None:
    ad = source.adapter
    prefix = ad.layer_prefix(layer)
    for name, axis in ad.residual_outputs(ad.layers()[layer], part):
        source.write(prefix + name, folded(source.read(prefix + name), t, axis))


class _CheckLoss:
    """The mean causal-LM loss of the pruned model on the held-out part, through the one runner with every
    layer's input remembered, so a change at layer j re-runs only layers j.. ."""

    def __init__(self, source: LayerSource, check: CalibrationData, batch_size: int, work_dir: Path | None):
        self.check = HeldOutCheck(source, check, batch_size=batch_size, work_dir=work_dir)

    def __call__(self, changed_at: int) -> float:
        self.changed(changed_at)
        return self.check.value(changed_at)

    def changed(self, layer: int) -> None:
        self.check.invalidate_from(layer)
