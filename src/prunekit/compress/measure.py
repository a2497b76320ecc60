"""Measured sensitivities: what cutting one sub-layer alone really does to the calibration loss, and the error
curves rescaled to agree with it.

A curve's errors (`curves`) are second-order estimates taken at the sub-layer's own output: they say well how
the refit stands in locally, but not what the layers above make of the change (through attention, the norms,
Gemma 3's post-norms). The allocation trades one sub-layer's error against another's, so it is their relative
scale that matters, and that is what goes wrong when a model's layers amplify a change differently (Gemma 3's
per-layer widths; docs/decisions.md). A probe cuts one sub-layer alone to
one count (refitted, as a candidate is), runs the layers from there up over a few fit sequences (their inputs
remembered, the top layer probed first so that each probe re-runs only the layers above it) and reads the
loss increase; each curve is then rescaled so that it passes through its probe. What a probe cannot see is
how cuts interact.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from prunekit.compress.curves import Curve
from prunekit.compress.stats import Sublayer
from prunekit.data import CalibrationData
from prunekit.engine.head import HeldOutCheck
from prunekit.engine.sources import LayerSource

# How far one sub-layer's scale may stray from the median scale: a probe whose loss barely moved (or fell,
# by the noise of a few thousand tokens) would otherwise make that sub-layer's every cut, removal included,
# look free.
SPREAD = 20.0


def probe_part(fit: CalibrationData, n: int) -> CalibrationData:
    """`n` sequences of the fit part, spread over it (the check part stays for choosing among candidates)."""
    total = len(fit.input_ids)
    idx = torch.linspace(0, total - 1, min(n, total)).round().long().unique()
    return CalibrationData(fit.input_ids[idx], fit.attention_mask[idx], fit.source, fit.sha256)


def probe_counts(curves: dict[Sublayer, Curve], uniform: dict[Sublayer, int]) -> dict[Sublayer, int]:
    """The count each sub-layer is probed at: an MLP at the uniform width that meets the budget (`uniform`, as
    `allocate.uniform_mlp` gives it), else at the allowed count nearest half its units; attention one unit
    fewer (on a model with one KV group per layer: removed)."""
    out: dict[Sublayer, int] = {}
    for s, c in curves.items():
        if len(c.ks) < 2:
            continue
        if s[1] == "mlp":
            out[s] = uniform.get(s, min(c.ks[1:], key=lambda k: abs(k - c.ks[0] / 2)))
        else:
            out[s] = c.ks[1]
    return out


def rescaled(curves: dict[Sublayer, Curve], probes: dict[Sublayer, tuple[int, float]]) -> dict[Sublayer, Curve]:
    """Every curve scaled so that its error at the probed count equals the measured loss increase; the scale
    kept within `SPREAD` of the median scale, and the median used where a probe says nothing (no probe, or a
    curve that estimates no error there)."""
    scale: dict[Sublayer, float] = {}
    for s, (k, delta) in probes.items():
        est = curves[s].error_at(k)
        if est > 0:
            scale[s] = max(delta, 0.0) / est
    positive = [a for a in scale.values() if a > 0]
    if not positive:
        return curves
    mid = statistics.median(positive)
    out = {}
    for s, c in curves.items():
        a = min(max(scale.get(s, mid), mid / SPREAD), mid * SPREAD)
        out[s] = replace(c, err=[e * a for e in c.err])
    return out


class Probe:
    """The loss (or with `kl`, the KL from the dense model) of the model as edited now over a few sequences,
    re-running only the layers from `layer` up; built, and its baseline taken, on the dense model. After each
    probe the caller undoes the edit at `layer`, so the states above it are dropped here; probing the
    layers top first, none of those would be read again anyway."""

    def __init__(self, source: LayerSource, calib: CalibrationData, batch_size: int, kl: bool,
                 total: Callable[[torch.Tensor], torch.Tensor], work_dir: Path | None):
        self.check = HeldOutCheck(source, calib, batch_size=batch_size, kl=kl, total=total, work_dir=work_dir)
        self.base = self.check.dense_value()

    def increase(self, layer: int) -> float:
        """How much the value rose over the dense model's, with the edit at `layer` in place."""
        value = self.check.value(layer)
        self.check.invalidate_from(layer)
        return value - self.base
