"""Expert drop as `compress` candidates (Mixture-of-Experts models, `params` budgets): for each expert score of
`moe.choose` (router statistics, REAP), the fewest experts removed from every MoE layer, the lowest-scoring
ones, that meet the budget. One count for every layer, so the result has a stock config; these candidates
remove experts only (no other cut). Removing an expert renormalises the routing over the experts left, which
zeroing the expert cannot reproduce, so the search scores each with its experts physically removed and put
back after (`moe.surgery.experts_removed`); a layer-streamed model reads its layers cut to the kept experts
meanwhile (`removed`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prunekit.adapters.moe import MoEAdapter
from prunekit.engine.sources import LayerSource
from prunekit.moe.choose import EXPERT_SCORES, choose_expert_drops
from prunekit.moe.stats import ExpertStats
from prunekit.moe.surgery import experts_removed
from prunekit.plans import LayerWidth

NAME = "experts ({score})"  # candidate names, by expert score


def removed_params(adapter: MoEAdapter, kept: dict[int, list[int]]) -> int:
    """Parameters removed when MoE layer i keeps experts `kept[i]`."""
    layers = adapter.layers()
    return sum((adapter.num_experts(layers[i]) - len(k)) * adapter.expert_params(layers[i]) for i, k in kept.items())


def expert_drop_candidates(adapter: MoEAdapter, stats: ExpertStats, need: int) -> dict[str, dict[int, list[int]]]:
    """Kept experts per MoE layer (original indices) by candidate name: for each expert score, the fewest
    experts per layer whose removal takes at least `need` parameters; a score none meets (at least one expert
    stays in every layer) gives no candidate."""
    layers = adapter.layers()
    fewest = min(adapter.num_experts(layers[i]) for i in adapter.moe_layers())
    per_n = sum(adapter.expert_params(layers[i]) for i in adapter.moe_layers())
    n = -(-need // per_n)  # ceil
    if n >= fewest:
        return {}
    out = {}
    for score in EXPERT_SCORES:
        plan = choose_expert_drops(adapter, stats, n, score)
        out[NAME.format(score=score)] = {i: list(w.experts or []) for i, w in sorted(plan.widths.items())}
    return out


@contextmanager
def removed(source: LayerSource, kept: dict[int, list[int]]) -> Iterator[None]:
    """`source`'s model with only experts `kept[i]` of each MoE layer i, then as it was: its modules cut (and put
    back) by `experts_removed`, and its layers read cut the same way meanwhile, which a layer-streamed source
    needs (its modules hold shapes only). For the search's source, which no width cut has narrowed yet."""
    with experts_removed(source.adapter, kept):  # type: ignore[arg-type]
        source.set_widths({i: LayerWidth(experts=sorted(k)) for i, k in kept.items()})
        try:
            yield
        finally:
            source.set_widths({})
