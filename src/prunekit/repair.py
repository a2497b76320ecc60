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
and both losses for every span. Architectures whose sub-layer outputs pass through a norm before the
residual add (Gemma 3) cannot take the fold and are refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.data import CalibrationData
from prunekit.engine.runner import LayerRunner, Observer, TensorStore
from prunekit.engine.sources import as_source
from prunekit.errors import PlanError
from prunekit.losses import mean_loss, split_check
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
        if spans and order[k - 1] in gone:
            spans[-1].removed.append(sub)
        elif k > 0:
            spans.append(Span(carrier=order[k - 1], removed=[sub]))
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
                c = self.store.get(f"repair{s}-c-b{b}").to(self.cc[s].device)
                d = masked_rows(_before_after(span.end[1], h_in, h_mid, h_out)[1], mask).to(c.device) - \
                    self.store.get(f"repair{s}-r-b{b}").to(c.device)
                self.cc[s] += c.T @ c
                self.cd[s] += c.T @ d
                self.dd[s] += float((d * d).sum())
                self.store.delete(f"repair{s}-c-b{b}")
                self.store.delete(f"repair{s}-r-b{b}")


def fit_map(cc: torch.Tensor, cd: torch.Tensor, dd: float, ridge: float) -> tuple[torch.Tensor, float]:
    """(T, relative residual ||C T - D||^2 / ||D||^2) of the ridge-to-identity least squares."""
    n = cc.shape[0]
    lam = ridge * float(torch.diagonal(cc).mean())  # scale-free: relative to the carrier's energy
    eye = torch.eye(n, dtype=torch.float64)
    t = torch.linalg.solve(cc + lam * eye, cd + lam * eye)
    resid = dd - 2 * float((t * cd).sum()) + float((t * (cc @ t)).sum())
    return t, resid / max(dd, 1e-300)


def _fold(proj: nn.Linear, t: torch.Tensor) -> None:
    """out = x W' + b  ->  (x W' + b) T."""
    with torch.no_grad():
        tt = t.to(proj.weight.dtype).to(proj.weight.device)
        proj.weight.copy_((tt.T @ proj.weight.to(tt.dtype)))
        if proj.bias is not None:
            proj.bias.copy_(proj.bias @ tt)


def check_repairable(adapter: ModelAdapter) -> None:
    if adapter.spec.output_norms:
        raise PlanError(f"linear repair folds a map into a sub-layer's output projection, but "
                        f"{adapter.model.config.model_type} normalises sub-layer outputs before the residual add "
                        "(the fold would not be linear); use --repair none")


def linear_repair(dense: nn.Module, pruned: nn.Module, plan: PruningPlan, calib: CalibrationData, *,
                  ridge: float = 1e-2, batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
    """Estimate the maps on `dense` (left untouched), fold the helpful ones into `pruned` (which carries
    `plan`, already applied), and return the record that goes into `plan.repair`."""
    source = as_source(dense)
    dense_ad = source.adapter
    check_repairable(dense_ad)
    spans = removed_spans(plan, dense_ad.num_layers)
    fit, check = split_check(calib, "linear repair")
    runner = LayerRunner(source, fit, batch_size=batch_size, progress=progress)
    stats = RepairStats(spans, dense_ad.hidden_size, runner.store)
    runner.run([stats], desc="repair statistics")
    pruned_ad = as_source(pruned).adapter
    # Original layer index -> the pruned model's layer (compaction removed emptied layers).
    attn, mlp = plan.drops_by_module()
    kept = [i for i in range(dense_ad.num_layers) if not (i in attn and i in mlp)]
    records = []
    loss = baseline = mean_loss(pruned, check, batch_size)
    for s, span in enumerate(spans):
        t, resid = fit_map(stats.cc[s], stats.cd[s], stats.dd[s], ridge)
        layer = pruned_ad.layers()[kept.index(span.carrier[0])]
        proj = pruned_ad.output_projection(layer, span.carrier[1])
        saved = (proj.weight.detach().clone(), None if proj.bias is None else proj.bias.detach().clone())
        _fold(proj, t)
        after = mean_loss(pruned, check, batch_size)
        applied = after < loss
        if applied:
            loss = after
        else:  # never make the plan worse on held-out samples
            with torch.no_grad():
                proj.weight.copy_(saved[0])
                if saved[1] is not None:
                    proj.bias.copy_(saved[1])  # type: ignore[union-attr]
        records.append({"carrier": {"layer": span.carrier[0], "module": span.carrier[1]},
                        "removed": [{"layer": i, "module": m} for i, m in span.removed],
                        "relative_residual": resid, "check_loss_after": after, "applied": applied})
    return {"method": "linear (ridge to identity, folded into the carrier's output projection)", "ridge": ridge,
            "fit_samples": int(len(fit.input_ids)), "check_samples": int(len(check.input_ids)),
            "check_loss_unrepaired": baseline, "check_loss": loss, "spans": records}
