"""Loss-guided choice of what to drop (BlockPruner / FinerCut style): module by module, greedily, the one
whose removal raises the causal-LM loss on the calibration tokens least (`criterion="loss"`), or the one that
moves the model's next-token distributions least from the dense model's (`criterion="kl"`: KL(dense ||
pruned) over the dense model's 256 most likely tokens per position, kept from the first pass: 3 KB per
token). The loss rewards whatever lowers the loss on the calibration text, even a change that predicts it
better than the dense model did; the KL asks to stay close to the model the user has.

Incremental. Removing a module in layer i changes nothing before layer i, so a trial re-runs layers i.. from
the inputs the runner remembered; trials go from the deepest candidate up, so the states a trial overwrote
are never needed by a later one (each trial invalidates the states past its layer). After the winner is
dropped, one pass from its layer brings the remembered states up to date for the next step.

Cost, in forward-pass equivalents over the calibration tokens (a full pass = L layers): each step costs
sum over its candidates of (L - layer)/L plus the LM head per trial, i.e. about half a pass per candidate.
`prefilter=k` keeps only the k candidates with the highest LLM-Drop cosine similarity (the cheap signal) per
step, so a full greedy search over n modules costs about n * (k/2 + 1) passes; `prefilter=None` tries every
candidate (about n * C/2 passes for C candidates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.data import CalibrationData
from prunekit.drop.choose import Target, candidates
from prunekit.drop.similarity import SimilarityScores
from prunekit.engine.head import HeldOutCheck
from prunekit.engine.sources import LayerSource, as_source
from prunekit.losses import KL_TOPK
from prunekit.plans import DropTarget

__all__ = ["KL_TOPK", "LossSearch"]


def _parts(d: DropTarget) -> list[str]:
    return ["attn", "mlp"] if d.module == "block" else [d.module]


class LossSearch:
    """Greedy loss-guided dropping over a model in memory or any layer source (the runner remembers every
    layer's inputs: in RAM, or in `work_dir`). A streamed model's trials replace modules of its skeleton,
    so a layer read while a module is removed reads only the tensors of what remains."""

    def __init__(self, model: nn.Module | LayerSource, adapter: ModelAdapter | None, calib: CalibrationData, *,
                 batch_size: int = 4, criterion: str = "loss", progress: bool = True,
                 work_dir: Path | None = None):
        source = as_source(model, adapter)
        self.adapter = source.adapter
        self.criterion = criterion
        # Every layer's input stays remembered (no recomputation from an earlier layer).
        self.check = HeldOutCheck(source, calib, batch_size=batch_size, kl=criterion == "kl", work_dir=work_dir,
                                  state_budget_bytes=1 << 62)
        self.progress = progress

    @property
    def passes(self) -> float:
        """Forward-pass equivalents spent (layers run / L)."""
        return self.check.passes

    def _loss(self, start: int) -> float:
        """The criterion on the current model, re-running layers `start`.."""
        return self.check.value(start)

    def trial(self, d: DropTarget) -> float:
        """Calibration loss with `d` removed as well (the model is left as it was)."""
        layer = self.adapter.layers()[d.layer]
        saved = {p: self.adapter.sublayer_modules(layer, p) for p in _parts(d)}
        for p in _parts(d):
            (self.adapter.remove_attention(layer, d.layer) if p == "attn" else self.adapter.remove_mlp(layer))
        try:
            return self._loss(d.layer)
        finally:
            for modules in saved.values():
                self.adapter.restore(layer, modules)
            self.check.invalidate_from(d.layer)

    def run(self, scores: SimilarityScores, target: Target, n: int, *,
            prefilter: int | None = 8) -> tuple[list[DropTarget], list[dict[str, Any]]]:
        """The `n` modules chosen one at a time, and the history (loss of every trial, per step)."""
        chosen: set[DropTarget] = set()
        history: list[dict[str, Any]] = []
        base = self.check.dense_value()
        current = scores
        for step in range(n):
            pool = [d for _, d in candidates(current, target, exclude=chosen)]
            pool = pool[:prefilter] if prefilter else pool
            trials = {d: self.trial(d) for d in sorted(pool, key=lambda d: -d.layer)}
            pick = min(trials, key=lambda d: (trials[d], -d.layer))
            chosen.add(pick)
            layer = self.adapter.layers()[pick.layer]
            for p in _parts(pick):
                (self.adapter.remove_attention(layer, pick.layer) if p == "attn" else self.adapter.remove_mlp(layer))
            base = self._loss(pick.layer)  # brings the remembered states past the winner up to date
            history.append({"step": step, "layer": pick.layer, "module": pick.module, "loss": base,
                            "trials": {f"{d.module}@{d.layer}": v for d, v in sorted(trials.items())}})
        return sorted(chosen), history
