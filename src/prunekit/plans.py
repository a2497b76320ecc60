"""Pruning plans: plain data with a JSON round-trip, and the pure functions that choose them from scores.

A plan says *what* goes (layer indices refer to the ORIGINAL model), never how; `surgery.py` applies it.
Every saved checkpoint carries its plan (`prunekit_plan.json`) with the scores, options and the hash of the
calibration tokens that produced it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from prunekit import __version__
from prunekit.errors import PlanError
from prunekit.scoring import SimilarityScores

Module = Literal["attn", "mlp", "block"]
Target = Literal["attn", "mlp", "block", "joint"]
TARGETS: tuple[str, ...] = ("attn", "mlp", "block", "joint")
PLAN_FILE = "prunekit_plan.json"
PLAN_FORMAT = 1


@dataclass(frozen=True, order=True)
class DropTarget:
    layer: int
    module: Module

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "module": self.module}


@dataclass
class LayerWidth:
    """Kept indices (into the ORIGINAL layer) of one layer's query heads, KV heads and MLP channels.
    None means "unchanged"."""

    heads: list[int] | None = None
    kv_heads: list[int] | None = None
    channels: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class PruningPlan:
    dropped: list[DropTarget] = field(default_factory=list)
    widths: dict[int, LayerWidth] = field(default_factory=dict)
    method: str = "none"
    options: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    # Recovery fine-tuning runs applied after the pruning (`prunekit.recovery`), oldest first.
    recovery: list[dict[str, Any]] = field(default_factory=list)
    version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "prunekit_version": self.version,
            "method": self.method,
            "options": self.options,
            "model": self.model,
            "calibration": self.calibration,
            "dropped": [d.to_json() for d in sorted(self.dropped)],
            "widths": {str(k): v.to_json() for k, v in sorted(self.widths.items())},
            "history": self.history,
            "scores": self.scores,
            # Only when there is one, so plans of un-healed models read exactly as before.
            **({"recovery": self.recovery} if self.recovery else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PruningPlan":
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"unsupported plan format {data.get('format')!r} (this prunekit reads {PLAN_FORMAT})")
        return cls(
            dropped=[DropTarget(int(d["layer"]), d["module"]) for d in data.get("dropped", [])],
            widths={int(k): LayerWidth(**v) for k, v in data.get("widths", {}).items()},
            method=data.get("method", "none"),
            options=dict(data.get("options", {})),
            scores=data.get("scores"),
            history=list(data.get("history", [])),
            calibration=dict(data.get("calibration", {})),
            model=dict(data.get("model", {})),
            recovery=list(data.get("recovery", [])),
            version=data.get("prunekit_version", __version__),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise PlanError(f"cannot read plan {path}: {e}") from e

    def drops_by_module(self) -> tuple[set[int], set[int]]:
        """(layers without attention, layers without MLP) after expanding blocks."""
        attn = {d.layer for d in self.dropped if d.module in ("attn", "block")}
        mlp = {d.layer for d in self.dropped if d.module in ("mlp", "block")}
        return attn, mlp


def normalize_drops(drops: Sequence[DropTarget]) -> list[DropTarget]:
    """Canonical form: a layer that loses both attention and MLP loses its block."""
    attn = {d.layer for d in drops if d.module in ("attn", "block")}
    mlp = {d.layer for d in drops if d.module in ("mlp", "block")}
    out = [DropTarget(i, "block") for i in sorted(attn & mlp)]
    out += [DropTarget(i, "attn") for i in sorted(attn - mlp)]
    out += [DropTarget(i, "mlp") for i in sorted(mlp - attn)]
    return sorted(out)


def check_n(target: str, n: int, available: int, num_layers: int) -> None:
    what = {"attn": "attention layers", "mlp": "MLP layers", "block": "blocks",
            "joint": "attention/MLP modules"}[target]
    if n < 1:
        raise PlanError(f"n must be at least 1 (got {n})")
    if n >= available:
        raise PlanError(
            f"cannot drop {n} {what}: the model has {num_layers} layers, so at most {available - 1} "
            f"{what} can be dropped (something must remain)"
        )


def candidates(scores: SimilarityScores, target: Target,
               exclude: set[DropTarget] = frozenset()) -> list[tuple[float, DropTarget]]:  # type: ignore[assignment]
    """(score, module) pairs eligible for `target`, most redundant first. Ties go to the deeper layer,
    following the paper's finding that deep modules are the more redundant."""
    rows: list[tuple[float, DropTarget]] = []
    dropped_attn = {d.layer for d in exclude if d.module in ("attn", "block")}
    dropped_mlp = {d.layer for d in exclude if d.module in ("mlp", "block")}
    for i in range(scores.num_layers):
        if target in ("attn", "joint") and i not in dropped_attn:
            rows.append((scores.attn[i], DropTarget(i, "attn")))
        if target in ("mlp", "joint") and i not in dropped_mlp:
            rows.append((scores.mlp[i], DropTarget(i, "mlp")))
        if target == "block" and not (i in dropped_attn and i in dropped_mlp):
            rows.append((scores.block[i], DropTarget(i, "block")))
    rows.sort(key=lambda r: (-r[0], -r[1].layer, r[1].module))
    return rows


def available_modules(target: Target, num_layers: int) -> int:
    return 2 * num_layers if target == "joint" else num_layers


def plan_drops(scores: SimilarityScores, target: Target, n: int, *, consecutive: bool = False) -> list[DropTarget]:
    """One-shot LLM-Drop: the `n` most redundant modules of the kind `target`.

    `consecutive` (Block Drop only) picks the run of n adjacent blocks whose removal joins the two most
    similar residual states, cos(h_i, h_{i+n})."""
    if target not in TARGETS:
        raise PlanError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    L = scores.num_layers
    check_n(target, n, available_modules(target, L), L)
    if consecutive:
        if target != "block":
            raise PlanError("--consecutive applies to block dropping only (--target block)")
        if scores.pairwise is None:
            raise PlanError("consecutive Block Drop needs pairwise similarities; score with pairwise=True")
        best = max(range(L - n + 1), key=lambda i: (scores.pairwise[i][i + n], i))  # type: ignore[index]
        return [DropTarget(i, "block") for i in range(best, best + n)]
    picked = [d for _, d in candidates(scores, target)[:n]]
    return normalize_drops(picked)
