"""The TransAct shot loop: collect statistics, rank, narrow, repeat, and build the plan (see the package
docstring for units, modes, shots and multiples)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.data import CalibrationData
from prunekit.plans import LayerWidth, PruningPlan
from prunekit.surgery import apply_plan, apply_widths, count_parameters, refresh_config
from prunekit.width.importance import get_scorer
from prunekit.width.ranking import (
    LayerUnits,
    layer_reference,
    per_layer_counts,
    rank_kv_groups,
    rank_mlp,
    rank_query_heads,
)
from prunekit.width.stats import ActivationCollector, WidthCollector
from prunekit.width.targets import (
    HeadMode,
    Keep,
    Mode,
    build_dims,
    check_width_options,
    current_units,
    geometric_schedule,
    round_counts,
)

SCHEDULE = "geometric"
NORMALISATION = "original-layer-median"


def _describe_keep(keep: Keep | None) -> Any:
    return keep if keep is None else (float(keep) if isinstance(keep, float) else int(keep))


def width_prune(model: nn.Module, adapter: ModelAdapter, calib: CalibrationData, *,
                mlp_keep: Keep | None = None, heads_keep: Keep | None = None, mode: Mode = "uniform",
                shots: int = 8, scorer: str = "activation", head_mode: HeadMode = "kv-groups",
                min_layer_keep: float = 0.1, multiple_of: int = 64, batch_size: int = 4,
                between_shots: Callable[[nn.Module, int], None] | None = None,
                progress: bool = True, collector: WidthCollector | None = None) -> PruningPlan:
    """Narrow `model` in place to the kept widths and return the plan (kept indices into the original layers).

    `mlp_keep` / `heads_keep`: a float ratio (0 < r <= 1) of each layer's width or an int count per layer
    (see the module docstring for what `heads_keep` counts in each `head_mode`); None leaves that part alone.
    `between_shots(model, shot)` is called after each shot that changed the model (1-based shot number),
    with the config already refreshed, e.g. for recovery training. Bad targets raise `PlanError` before the
    model is touched.

    `collector`: where the activation statistics come from; default: an `ActivationCollector` running the
    model in memory. A layer-streamed run passes an `ActivationCollector` over its `StreamedLayers` and the
    meta-device skeleton as `model`: the planning and the surgery here then only touch shapes."""
    check_width_options(mlp_keep=mlp_keep, heads_keep=heads_keep, mode=mode, shots=shots, scorer=scorer,
                        head_mode=head_mode, min_layer_keep=min_layer_keep, multiple_of=multiple_of)
    dims = build_dims(adapter, mlp_keep, heads_keep, head_mode, mode, min_layer_keep, multiple_of)
    sc = get_scorer(scorer)
    layers = adapter.layers()
    hd = adapter.head_dim
    cfg = adapter.config
    model_info = {k: getattr(cfg, k, None) for k in (
        "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "intermediate_size")}
    model_info["head_dim"] = hd
    params_before = count_parameters(model)

    # Original indices of what each layer currently holds (composed across shots).
    orig_heads: dict[int, list[int]] = {}
    orig_kv: dict[int, list[int]] = {}
    orig_ch: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        if adapter.has_attention(layer):
            nh, nkv = adapter.attention_shape(layer)
            orig_heads[i], orig_kv[i] = list(range(nh)), list(range(nkv))
        if adapter.has_mlp(layer):
            orig_ch[i] = list(range(adapter.mlp_width(layer)))

    # Per-shot targets: per layer (uniform) or the total (per-layer).
    schedules: dict[str, Any] = {}
    for d in dims:
        if mode == "uniform":
            schedules[d.kind] = {i: geometric_schedule(d.start[i], d.target[i], shots) for i in d.layers}
        else:
            schedules[d.kind] = geometric_schedule(d.total_start, d.total_target, shots)

    if collector is None:
        collector = ActivationCollector(model, calib, adapter=adapter, batch_size=batch_size, progress=progress)
    original_units = {i: (len(orig_heads.get(i, ())), len(orig_kv.get(i, ())), len(orig_ch.get(i, ())))
                      for i in range(len(layers))}

    def narrowed_so_far() -> dict[int, LayerWidth]:
        out: dict[int, LayerWidth] = {}
        for i, (nh, nkv, nch) in original_units.items():
            w = LayerWidth()
            if i in orig_heads and (len(orig_heads[i]) < nh or len(orig_kv[i]) < nkv):
                w.heads, w.kv_heads = list(orig_heads[i]), list(orig_kv[i])
            if i in orig_ch and len(orig_ch[i]) < nch:
                w.channels = list(orig_ch[i])
            if w.to_json():
                out[i] = w
        return out
    history: list[dict[str, Any]] = []
    first_scores: dict[str, Any] = {}
    scored_kinds: set[str] = set()
    # Per-layer normalisers of the per-layer mode, from the first scoring of each kind (unpruned model).
    references: dict[str, dict[int, float]] = {}
    rounded: set[str] = set()
    for shot in range(1, shots + 1):
        current = {d.kind: {i: current_units(adapter, layers[i], d.kind) for i in d.layers} for d in dims}
        wanted: dict[str, Any] = {}
        for d in dims:
            sch = schedules[d.kind]
            wanted[d.kind] = ({i: sch[i][shot - 1] for i in d.layers} if mode == "uniform" else sch[shot - 1])
        # A per-layer dimension whose final shot rounded its widths to multiples is finished, even if the
        # rounding left its total a little above the target.
        changing = [d for d in dims if d.kind not in rounded and (
            any(wanted[d.kind][i] < current[d.kind][i] for i in d.layers) if mode == "uniform"
            else wanted[d.kind] < sum(current[d.kind].values()))]
        if not changing:
            continue
        need_attn = any(d.kind != "mlp" for d in changing)
        need_mlp = any(d.kind == "mlp" for d in changing)
        stats = collector.collect(attn=need_attn, mlp=need_mlp, desc=f"width shot {shot}/{shots}",
                                  widths=narrowed_so_far())

        plan_now: dict[int, LayerWidth] = {}
        for d in changing:
            units: dict[int, LayerUnits] = {}
            raw: dict[int, list[float]] = {}
            for i in d.layers:
                layer = layers[i]
                st = stats[i]
                if d.kind == "mlp":
                    down = adapter.mlp_projections(layer)[2]
                    wt = st.mlp_weight if st.mlp_weight is not None else down.weight
                    u, s = rank_mlp(sc, st.mlp, wt)  # type: ignore[arg-type]
                else:
                    nh, nkv = adapter.attention_shape(layer)
                    o = adapter.attn_projections(layer)[3]
                    wt = st.attn_weight if st.attn_weight is not None else o.weight
                    build = rank_kv_groups if d.kind == "kv-groups" else rank_query_heads
                    u, s = build(sc, st.attn, wt, nh, nkv, hd)  # type: ignore[arg-type]
                units[i] = u
                raw[i] = [float(v) for v in s]
            if mode == "uniform":
                counts = wanted[d.kind]
            else:
                ref = references.setdefault(d.kind, {i: layer_reference(u.scores) for i, u in units.items()})
                counts = per_layer_counts(units, current[d.kind], wanted[d.kind], d.floor, ref)
                if d.kind == "mlp" and multiple_of > 1 and wanted[d.kind] == d.total_target:
                    counts = round_counts(counts, current[d.kind], d.floor, multiple_of, wanted[d.kind])
                    rounded.add(d.kind)
            if d.kind not in scored_kinds:
                scored_kinds.add(d.kind)
                # Scores of the unpruned model (original indices) go into the plan; MLP ones as per-layer
                # summaries to keep the plan small.
                if d.kind == "mlp":
                    first_scores["mlp"] = {str(i): {"min": min(v), "mean": sum(v) / len(v), "max": max(v)}
                                           for i, v in raw.items()}
                else:
                    first_scores["query_heads" if d.kind == "query-heads" else "kv_groups"] = {
                        str(i): v for i, v in raw.items()}
            for i in d.layers:
                if counts[i] >= current[d.kind][i]:
                    continue
                w = plan_now.setdefault(i, LayerWidth())
                kept = units[i].keep_for(counts[i])
                if d.kind == "mlp":
                    w.channels = kept  # type: ignore[assignment]
                else:
                    w.heads, w.kv_heads = kept  # type: ignore[misc]

        apply_widths(adapter, plan_now)
        for i, w in plan_now.items():
            if w.channels is not None:
                orig_ch[i] = [orig_ch[i][c] for c in w.channels]
            if w.heads is not None:
                orig_heads[i] = [orig_heads[i][h] for h in w.heads]
                orig_kv[i] = [orig_kv[i][k] for k in w.kv_heads]  # type: ignore[union-attr]
        refresh_config(adapter)
        history.append({
            "shot": shot,
            "parameters": count_parameters(model),
            "widths": {str(i): width_counts(adapter, layers[i]) for i in range(len(layers))},
        })
        if between_shots is not None:
            between_shots(model, shot)

    widths: dict[int, LayerWidth] = {}
    for i in range(len(layers)):
        w = LayerWidth()
        if heads_keep is not None and i in orig_heads:
            w.heads, w.kv_heads = list(orig_heads[i]), list(orig_kv[i])
        if mlp_keep is not None and i in orig_ch:
            w.channels = list(orig_ch[i])
        if w.to_json():
            widths[i] = w
    plan = PruningPlan(
        widths=widths,
        method="transact",
        options={
            "mlp_keep": _describe_keep(mlp_keep), "heads_keep": _describe_keep(heads_keep), "mode": mode,
            "shots": shots, "scorer": scorer, "head_mode": head_mode, "schedule": SCHEDULE,
            "normalisation": NORMALISATION if mode == "per-layer" else None,
            "min_layer_keep": min_layer_keep if mode == "per-layer" else None,
            "multiple_of": multiple_of,
            "batch_size": batch_size, "parameters_before": params_before,
            "parameters_after": count_parameters(model),
        },
        scores={"scorer": scorer, "first_shot": first_scores},
        history=history,
        calibration=calib.describe(),
        model=model_info,
    )
    apply_plan(adapter, plan)  # already narrowed: this records the plan and refreshes the config
    return plan


# The plan history's names for the adapter's config-field widths (part of the plan's JSON format).
_HISTORY_NAMES = {"num_attention_heads": "heads", "num_key_value_heads": "kv_heads", "intermediate_size": "channels"}


def width_counts(adapter: ModelAdapter, layer: nn.Module) -> dict[str, int]:
    return {_HISTORY_NAMES[k]: v for k, v in adapter.layer_widths(layer).items()}
