"""The held-out check of a `compress` candidate: the calibration loss on the check part of the calibration
data, or (criterion "kl") the KL divergence there from the dense model's top-`KL_TOPK` next-token
distributions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from prunekit.data import CalibrationData
from prunekit.engine.head import HeldOutCheck
from prunekit.engine.sources import LayerSource
from prunekit.errors import PlanError

CRITERIA = ("loss", "kl")


def check_criterion(criterion: str) -> None:
    """A `PlanError` unless `criterion` is one of `CRITERIA`."""
    if criterion not in CRITERIA:
        raise PlanError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


class HeldOutScorer:
    """Scores the model as it is now on `check` through the one layer runner (layer-0 inputs remembered, so a
    candidate costs one pass of the layers): mean NLL and, with `kl`, the KL from the dense model, sums
    totalled over processes by `total`. With `kl` the dense model's top-K logits are taken here, so build it
    before any edit. `work_dir`: where the runner's hidden states wait (None: in RAM)."""

    def __init__(self, source: LayerSource, check: CalibrationData, *, batch_size: int, kl: bool,
                 total: Callable[[torch.Tensor], torch.Tensor], work_dir: Path | None):
        # A candidate edits layers anywhere: only layer 0's inputs are worth remembering.
        self.check = HeldOutCheck(source, check, batch_size=batch_size, kl=kl, total=total, work_dir=work_dir,
                                  remember_inputs=False)

    def score(self) -> tuple[float, float | None]:
        """(mean loss, KL from the dense model or None) of the model as edited now."""
        self.check.invalidate_from(0)
        return self.check.measure(0)
