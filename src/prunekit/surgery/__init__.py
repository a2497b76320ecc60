"""Surgery: apply a plan to a model's weights and config, in place.

`apply_plan` is the one way a plan changes a model, for both algorithms: widths first (kept indices of the
original layers), then drops, then compaction and the config refresh. `llm_drop` and `width_prune` call it
before they return, so their model is pruned when they return; applying the same plan again to that model
changes nothing (the model remembers which plans it carries), and applying it to a fresh copy of the
original model rebuilds the same model, unless the saved model's weights were also edited (refitted,
repaired or healed: `PruningPlan.weight_edits`); such a plan is refused, pointing at the recipe that
rebuilds the whole model, unless only its structure is asked for.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prunekit.adapters import ModelAdapter
from prunekit.errors import PlanError
from prunekit.plans import PruningPlan, check_layers
from prunekit.surgery.structure import compact, count_parameters, mark_drops, refresh_config
from prunekit.surgery.widths import apply_widths

__all__ = ["apply_plan", "apply_widths", "compact", "count_parameters", "mark_drops", "refresh_config"]

# Attribute on the model object (not global state) naming the plans already applied to it.
_APPLIED = "_prunekit_applied_plans"


def _fingerprint(plan: PruningPlan) -> str:
    return hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True).encode()).hexdigest()


def apply_plan(adapter: ModelAdapter, plan: PruningPlan, *, structure_only: bool = False) -> dict[str, Any] | None:
    """Apply widths (if any), then drops, then compaction and the config refresh, in place. Returns the
    heterogeneous structure written into the config (None for a stock one). A plan already applied to this
    model object is not applied twice (drop indices refer to the original layers, which compaction renumbers).
    A plan whose saved model also has edited weights is refused unless `structure_only` (the caller brings
    the edited weights, or wants the structure alone)."""
    edits = plan.weight_edits()
    if edits and not structure_only:
        raise PlanError(f"this plan's model also carries {', '.join(edits)} in its weights, which a plan does not "
                        f"hold: load the saved checkpoint itself, rebuild it with `prunekit run "
                        f"CHECKPOINT/prunekit_recipe.yaml`, or pass structure_only=True for the pruned structure")
    applied: set[str] = getattr(adapter.model, _APPLIED, set())
    key = _fingerprint(plan)
    if key in applied:
        return getattr(adapter.model.config, "prunekit", None)
    # Before any change: a negative index would silently count from the end, a large one fail halfway.
    check_layers(plan, adapter.num_layers)
    if plan.widths:
        apply_widths(adapter, plan.widths)
    mark_drops(adapter, plan.dropped)
    compact(adapter)
    structure = refresh_config(adapter)
    setattr(adapter.model, _APPLIED, applied | {key})
    return structure
