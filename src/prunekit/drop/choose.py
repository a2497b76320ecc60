"""Choosing what to drop from LLM-Drop scores: pure functions over `SimilarityScores`."""

from __future__ import annotations

from typing import Literal

from prunekit.drop.similarity import SimilarityScores
from prunekit.errors import PlanError
from prunekit.plans import DropTarget, normalize_drops

Target = Literal["attn", "mlp", "block", "joint"]
TARGETS: tuple[str, ...] = ("attn", "mlp", "block", "joint")


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
