"""The held-out check of a `compress` candidate: the calibration loss on the check part of the calibration
data, or (criterion "kl") the KL divergence there from the dense model's top-`KL_TOPK` next-token
distributions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from prunekit.data import CalibrationData
from prunekit.engine.head import LossObserver
from prunekit.engine.runner import LayerRunner
from prunekit.engine.sources import LayerSource
from prunekit.errors import PlanError
from prunekit.losses import KL_TOPK, Reference, means

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
        self.source, self.total = source, total
        self.runner = LayerRunner(source, check, batch_size=batch_size, work_dir=work_dir, progress=False)
        self.reference: Reference | None = None
        if kl:
            obs = LossObserver(source, self.runner.batches, keep_topk=KL_TOPK)
            self.runner.run([obs])
            self.reference = [obs.kept[b] for b in range(len(self.runner.batches))]

    def score(self) -> tuple[float, float | None]:
        """(mean loss, KL from the dense model or None) of the model as edited now."""
        self.runner.invalidate_from(0)
        obs = LossObserver(self.source, self.runner.batches, reference=self.reference)
        self.runner.run([obs])
        return means(self.total(obs.sums), self.reference is not None)
