"""Surgery: apply a plan to a model's weights and config, in place.

`apply_plan` is the one way a plan changes a model, for both algorithms: widths first (kept indices of the
original layers), then drops, then compaction and the config refresh. The methods only propose plans; the
jobs (and the convenience functions `llm_drop`, `width_prune`, `compress` of the Python API) apply them here.
Applying a plan to a model that already has the plan's structure changes nothing (told from the modules
themselves, not from a record of past calls), and applying it to a fresh copy of the original model
rebuilds the same model, unless the saved model's weights were also edited (refitted, repaired or healed:
`PruningPlan.weight_edits`); such a plan is refused, pointing at the recipe that rebuilds the whole model,
unless only its structure is asked for.
"""

from __future__ import annotations

from typing import Any

from prunekit.adapters import ModelAdapter
from prunekit.errors import PlanError
from prunekit.moe.surgery import check_expert_plan
from prunekit.plans import PruningPlan, check_layers
from prunekit.surgery.structure import compact, count_parameters, mark_drops, refresh_config
from prunekit.surgery.widths import apply_widths

__all__ = ["apply_plan", "carries", "apply_widths", "compact", "count_parameters", "mark_drops", "refresh_config"]

def carries(adapter: ModelAdapter, plan: PruningPlan) -> bool:
    """Whether the model already has the structure `plan` gives its original: every layer the plan empties
    gone (the original's layer count is the plan's `model["num_hidden_layers"]`), every sub-layer it drops
    absent, every other one present, and every narrowed layer at the plan's widths. Only a plan that changes
    nothing is also carried by its original model (applying it is a no-op)."""
    attn = {d.layer for d in plan.dropped if d.module in ("attn", "block")}
    mlp = {d.layer for d in plan.dropped if d.module in ("mlp", "block")}
    emptied = attn & mlp
    layers = adapter.layers()
    base = plan.model.get("num_hidden_layers")
    if emptied and base is None:
        return False  # an original and its result may then differ only in their number of layers
    if base is not None and len(layers) + len(emptied) != base:
        return False
    kept = [i for i in range(len(layers) + len(emptied)) if i not in emptied]
    if len(kept) != len(layers) or any(not 0 <= i < len(kept) + len(emptied) for i in attn | mlp | set(plan.widths)):
        return False
    for layer, i in zip(layers, kept):
        if adapter.has_attention(layer) == (i in attn) or adapter.has_mlp(layer) == (i in mlp):
            return False
        if i in plan.widths and not _has_widths(adapter.layer_widths(layer),
                                                adapter.planned_widths(layer, plan.widths[i])):
            return False
    return True


def _has_widths(have: dict[str, int], want: dict[str, int]) -> bool:
    return all(have[key] == n for key, n in want.items() if key in have)


def apply_plan(adapter: ModelAdapter, plan: PruningPlan, *, structure_only: bool = False) -> dict[str, Any] | None:
    """Apply widths (if any), then drops, then compaction and the config refresh, in place. Returns the
    heterogeneous structure written into the config (None for a stock one). A model that already has the
    plan's structure (`carries`) is not cut again (drop indices and kept widths refer to the original
    layers, which the first application renumbered and cut); its config is derived from its modules all the
    same. A plan whose saved model also has edited weights
    is refused unless `structure_only` (the caller brings the edited weights, or wants the structure alone)."""
    edits = plan.weight_edits()
    if edits and not structure_only:
        raise PlanError(f"this plan's model also carries {', '.join(edits)} in its weights, which a plan does not "
                        f"hold: load the saved checkpoint itself, rebuild it with `prunekit run "
                        f"CHECKPOINT/prunekit_recipe.yaml`, or pass structure_only=True for the pruned structure")
    check_expert_plan(adapter, plan.widths)
    if not carries(adapter, plan):
        # Before any change: a negative index would silently count from the end, a large one fail halfway.
        check_layers(plan, adapter.num_layers)
        if plan.widths:
            apply_widths(adapter, plan.widths)
        mark_drops(adapter, plan.dropped)
    compact(adapter)
    return refresh_config(adapter)
