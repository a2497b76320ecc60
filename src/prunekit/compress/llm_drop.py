"""LLM-Drop's own one-shot plans as `compress` candidates: for each drop target (attention, MLP, block, joint),
the fewest cosine-ranked drops that meet the budget. The held-out check can then pick them where the Fisher
estimate misjudges whole drops, so compress is never worse than LLM-Drop's own plan (docs/decisions.md)."""

from __future__ import annotations

from pathlib import Path

from prunekit.compress.budget import SublayerCost, removed
from prunekit.compress.stats import Sublayer
from prunekit.data import CalibrationData
from prunekit.drop.choose import TARGETS, plan_drops
from prunekit.drop.scorer import SimilarityScorer
from prunekit.engine.sources import LayerSource
from prunekit.errors import PlanError
from prunekit.plans import PruningPlan


def llm_drop_candidates(src: LayerSource, fit: CalibrationData, costs: dict[Sublayer, SublayerCost], need: int,
                        key: str, batch_size: int, work_dir: Path | None) -> dict[str, dict[Sublayer, int]]:
    """For each LLM-Drop target, the fewest cosine-ranked drops that remove at least `need` of `key`, as kept
    counts (0: dropped), by candidate name. One forward pass over `fit`: scored on the whole fit part in every
    process (not a shard), so that all ranks agree."""
    adapter = src.adapter
    scorer = SimilarityScorer(src, fit, batch_size=batch_size, pairwise=False, rescore=False, work_dir=work_dir,
                              progress=False)
    scores = scorer.score()
    scorer.cleanup()
    out: dict[str, dict[Sublayer, int]] = {}
    for target in TARGETS:
        for n in range(1, 2 * adapter.num_layers + 1):
            try:
                drops = plan_drops(scores, target, n)  # type: ignore[arg-type]
            except PlanError:
                break  # more than the model has of this kind
            attn, mlp = PruningPlan(dropped=drops).drops_by_module()
            counts = {s: 0 for s in [*((i, "attn") for i in attn), *((i, "mlp") for i in mlp)] if s in costs}
            if removed(costs, counts, key) >= need:
                out[f"LLM-Drop {target}"] = counts
                break
    return out
