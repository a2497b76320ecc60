"""Pruning plans: plain data with a JSON round-trip.

A plan says *what* goes (layer indices refer to the ORIGINAL model), never how; `prunekit.surgery` applies
it, and the algorithms (`prunekit.drop`, `prunekit.width`) choose it.
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

Module = Literal["attn", "mlp", "block"]
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
    # Training-free linear repair after dropping (`prunekit.repair`): the maps' fit and whether each was kept.
    repair: dict[str, Any] | None = None
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
            **({"repair": self.repair} if self.repair else {}),
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
            repair=data.get("repair"),
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
