"""A candidate of `compress`: the record of one model tried (kept units, what it removes, how it checked), the
list of every candidate tried so far, and a candidate's pruning plan (drops and widths)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.adapters import ModelAdapter
from prunekit.compress.stats import Sublayer
from prunekit.losses import loss_perplexity
from prunekit.plans import DropTarget, LayerWidth, normalize_drops

# Candidates at the budget that get the error correction, best first: it can reorder them, and each keeps a
# copy of its edited projections until then.
CORRECTED = 2


@dataclass
class Candidate:
    """One model tried: kept units per cut sub-layer (ORIGINAL unit ids) and how it scored; `experts`: kept
    experts per MoE layer of an expert-drop candidate (`compress.experts`; such a candidate cuts nothing else)."""

    name: str
    kept: dict[Sublayer, list[int]]
    removed_params: int
    removed_kv: int
    check_loss: float
    at_budget: bool
    check_kl: float | None = None  # KL from the dense model, with criterion="kl"
    weights: dict[Sublayer, torch.Tensor] = field(default_factory=dict, repr=False)
    experts: dict[int, list[int]] = field(default_factory=dict)

    @property
    def value(self) -> float:
        """What candidates are chosen by: the held-out loss, or the KL from the dense model."""
        return self.check_loss if self.check_kl is None else self.check_kl

    def row(self, totals: dict[str, int]) -> dict[str, Any]:
        """The candidate table's row: removed fractions of the dense `totals`, the check loss and perplexity."""
        row = {"name": self.name, "removed_params": self.removed_params / totals["params"],
               "removed_kv": self.removed_kv / totals["kv"] if totals["kv"] else 0.0,
               "check_loss": self.check_loss, "check_ppl": loss_perplexity(self.check_loss),
               "at_budget": self.at_budget}
        return row if self.check_kl is None else {**row, "check_kl": self.check_kl}


class Tried:
    """Every candidate tried so far, in the order tried. Only the best `CORRECTED` candidates at the budget keep
    their edited projections (that many models' worth of them, not one per candidate): one of them will be
    corrected and cut."""

    def __init__(self) -> None:
        self.all: list[Candidate] = []

    def add(self, c: Candidate, snapshot: Callable[[], dict[Sublayer, torch.Tensor]]) -> None:
        """`c` remembered; with `snapshot()` (the edited projections now) where it is among the best."""
        if c.at_budget and self._among_best(c.value):
            c.weights = snapshot()
        self.all.append(c)
        for t in self.ranked()[CORRECTED:]:
            t.weights = {}

    def add_corrected(self, c: Candidate) -> None:
        """A corrected candidate: its weights are written, not kept."""
        self.all.append(c)

    def ranked(self) -> list[Candidate]:
        """The candidates at the budget, best first."""
        return sorted((t for t in self.all if t.at_budget), key=lambda t: t.value)

    def values(self) -> dict[str, float]:
        return {c.name: c.value for c in self.all}

    def rows(self, totals: dict[str, int]) -> list[dict[str, Any]]:
        return [c.row(totals) for c in self.all]

    def __len__(self) -> int:
        return len(self.all)

    def _among_best(self, value: float) -> bool:
        ranked = self.ranked()
        return len(ranked) < CORRECTED or value < ranked[CORRECTED - 1].value


def plan_for(adapter: ModelAdapter, kept: dict[Sublayer, list[int]],
             experts: dict[int, list[int]] | None = None) -> tuple[list[DropTarget], dict[int, LayerWidth]]:
    """Drops and widths (ORIGINAL indices) of a candidate (`experts`: kept experts per MoE layer)."""
    drops: list[DropTarget] = []
    widths: dict[int, LayerWidth] = {i: LayerWidth(experts=sorted(e)) for i, e in (experts or {}).items()}
    for (i, part), units in sorted(kept.items()):
        if not units:
            drops.append(DropTarget(i, part))  # type: ignore[arg-type]
            continue
        w = widths.setdefault(i, LayerWidth())
        if part == "mlp":
            w.channels = sorted(units)
        else:
            nh, nkv = adapter.attention_shape(adapter.layers()[i])
            g = nh // nkv
            w.kv_heads = sorted(units)
            w.heads = [k * g + j for k in sorted(units) for j in range(g)]
    return normalize_drops(drops), widths
