"""The TransAct shot loop: collect statistics, rank, narrow, repeat, and build the plan (see the package
docstring for units, modes, shots and multiples)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.data import CalibrationData
from prunekit.plans import LayerWidth, PruningPlan
from prunekit.surgery import apply_widths, count_parameters, refresh_config
from prunekit.width.importance import Scorer, get_scorer
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
    Dim,
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
                progress: bool = True, collector: WidthCollector | None = None,
                source: str | None = None) -> PruningPlan:
    """Narrow `model` in place to the kept widths and return the plan (kept indices into the original layers).
    `source`: how the run named the model, recorded in the plan (as `llm_drop` does).

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
    layers = adapter.layers()
    model_info = {"source": source, **_model_info(adapter)}
    params_before = count_parameters(model)
    origins = _Origins.of(adapter)
    ranker = _Ranker(adapter, get_scorer(scorer), mode, multiple_of)
    schedules = {d.kind: _schedule(d, mode, shots) for d in dims}
    if collector is None:
        collector = ActivationCollector(model, calib, adapter=adapter, batch_size=batch_size, progress=progress)

    history: list[dict[str, Any]] = []
    for shot in range(1, shots + 1):
        current = {d.kind: {i: current_units(adapter, layers[i], d.kind) for i in d.layers} for d in dims}
        wanted = {d.kind: _wanted(d, schedules[d.kind], mode, shot) for d in dims}
        changing = ranker.changing(dims, current, wanted)
        if not changing:
            continue
        stats = collector.collect(attn=any(d.kind != "mlp" for d in changing),
                                  mlp=any(d.kind == "mlp" for d in changing),
                                  desc=f"width shot {shot}/{shots}", widths=origins.narrowed())
        plan_now: dict[int, LayerWidth] = {}
        for d in changing:
            ranker.narrow(d, stats, current[d.kind], wanted[d.kind], plan_now)
        apply_widths(adapter, plan_now)
        origins.compose(plan_now)
        refresh_config(adapter)
        history.append({
            "shot": shot,
            "parameters": count_parameters(model),
            "widths": {str(i): width_counts(adapter, layers[i]) for i in range(len(layers))},
        })
        if between_shots is not None:
            between_shots(model, shot)

    plan = PruningPlan(
        widths=origins.widths(heads=heads_keep is not None, mlp=mlp_keep is not None),
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
        scores={"scorer": scorer, "first_shot": ranker.first_scores},
        history=history,
        calibration=calib.describe(),
        model=model_info,
    )
    return plan


def _model_info(adapter: ModelAdapter) -> dict[str, Any]:
    cfg = adapter.config
    info = {k: getattr(cfg, k, None) for k in (
        "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "intermediate_size")}
    info["head_dim"] = adapter.head_dim
    return info


def _schedule(d: Dim, mode: Mode, shots: int) -> Any:
    """Per-shot targets: per layer (uniform) or of the total (per-layer)."""
    if mode == "uniform":
        return {i: geometric_schedule(d.start[i], d.target[i], shots) for i in d.layers}
    return geometric_schedule(d.total_start, d.total_target, shots)


def _wanted(d: Dim, schedule: Any, mode: Mode, shot: int) -> Any:
    if mode == "uniform":
        return {i: schedule[i][shot - 1] for i in d.layers}
    return schedule[shot - 1]


@dataclass
class _Origins:
    """Original indices of what each layer holds now. Each shot keeps indices into the layer as the earlier
    shots left it, so they are composed here to give the plan (and a streamed collector) original indices."""

    heads: dict[int, list[int]] = field(default_factory=dict)
    kv: dict[int, list[int]] = field(default_factory=dict)
    channels: dict[int, list[int]] = field(default_factory=dict)
    sizes: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # original (heads, kv, channels)

    @classmethod
    def of(cls, adapter: ModelAdapter) -> _Origins:
        o = cls()
        for i, layer in enumerate(adapter.layers()):
            if adapter.has_attention(layer):
                nh, nkv = adapter.attention_shape(layer)
                o.heads[i], o.kv[i] = list(range(nh)), list(range(nkv))
            if adapter.has_mlp(layer):
                o.channels[i] = list(range(adapter.mlp_width(layer)))
            o.sizes[i] = (len(o.heads.get(i, ())), len(o.kv.get(i, ())), len(o.channels.get(i, ())))
        return o

    def narrowed(self) -> dict[int, LayerWidth]:
        """Only the layers narrowed so far, and only their narrowed parts."""
        out: dict[int, LayerWidth] = {}
        for i, (nh, nkv, nch) in self.sizes.items():
            w = self._width(i, heads=len(self.heads.get(i, ())) < nh or len(self.kv.get(i, ())) < nkv,
                            channels=len(self.channels.get(i, ())) < nch)
            if w.to_json():
                out[i] = w
        return out

    def compose(self, shot: dict[int, LayerWidth]) -> None:
        for i, w in shot.items():
            if w.channels is not None:
                self.channels[i] = [self.channels[i][c] for c in w.channels]
            if w.heads is not None:
                self.heads[i] = [self.heads[i][h] for h in w.heads]
                self.kv[i] = [self.kv[i][k] for k in w.kv_heads]  # type: ignore[union-attr]

    def widths(self, *, heads: bool, mlp: bool) -> dict[int, LayerWidth]:
        """The plan's widths: every layer of each pruned part, narrowed or not."""
        return {i: w for i in self.sizes if (w := self._width(i, heads=heads, channels=mlp)).to_json()}

    def _width(self, i: int, *, heads: bool, channels: bool) -> LayerWidth:
        """Layer `i`'s kept original indices of the parts asked for (those it has)."""
        w = LayerWidth()
        if heads and i in self.heads:
            w.heads, w.kv_heads = list(self.heads[i]), list(self.kv[i])
        if channels and i in self.channels:
            w.channels = list(self.channels[i])
        return w


class _Ranker:
    """Ranks one dimension's units on a shot's statistics and chooses how many each layer keeps. Remembers
    what later shots need: the per-layer mode's normalisers (from the unpruned model's scores), which
    dimensions were already rounded to multiples, and the first scores for the plan."""

    def __init__(self, adapter: ModelAdapter, scorer: Scorer, mode: Mode, multiple_of: int) -> None:
        self.adapter, self.scorer, self.mode, self.multiple_of = adapter, scorer, mode, multiple_of
        self.references: dict[str, dict[int, float]] = {}
        self.rounded: set[str] = set()
        self.first_scores: dict[str, Any] = {}

    def changing(self, dims: list[Dim], current: dict[str, Any], wanted: dict[str, Any]) -> list[Dim]:
        """The dimensions this shot narrows. A per-layer dimension whose final shot rounded its widths to
        multiples is finished, even if the rounding left its total a little above the target."""
        def shrinks(d: Dim) -> bool:
            if self.mode == "uniform":
                return any(wanted[d.kind][i] < current[d.kind][i] for i in d.layers)
            return bool(wanted[d.kind] < sum(current[d.kind].values()))
        return [d for d in dims if d.kind not in self.rounded and shrinks(d)]

    def narrow(self, d: Dim, stats: Any, current: dict[int, int], wanted: Any,
               plan: dict[int, LayerWidth]) -> None:
        """Add to `plan` the kept units (indices into the current layers) of every layer `d` narrows now."""
        units, raw = self._rank(d, stats)
        counts = self._counts(d, units, current, wanted)
        self._remember_first(d.kind, raw)
        for i in d.layers:
            if counts[i] >= current[i]:
                continue
            w = plan.setdefault(i, LayerWidth())
            kept = units[i].keep_for(counts[i])
            if d.kind == "mlp":
                w.channels = kept  # type: ignore[assignment]
            else:
                w.heads, w.kv_heads = kept  # type: ignore[misc]

    def _rank(self, d: Dim, stats: Any) -> tuple[dict[int, LayerUnits], dict[int, list[float]]]:
        ad = self.adapter
        layers = ad.layers()
        units: dict[int, LayerUnits] = {}
        raw: dict[int, list[float]] = {}
        for i in d.layers:
            layer, st = layers[i], stats[i]
            if d.kind == "mlp":
                wt = st.mlp_weight if st.mlp_weight is not None else ad.output_projection(layer, "mlp").weight
                u, s = rank_mlp(self.scorer, st.mlp, wt)
            else:
                nh, nkv = ad.attention_shape(layer)
                wt = st.attn_weight if st.attn_weight is not None else ad.output_projection(layer, "attn").weight
                build = rank_kv_groups if d.kind == "kv-groups" else rank_query_heads
                u, s = build(self.scorer, st.attn, wt, nh, nkv, ad.head_dim)
            units[i] = u
            raw[i] = [float(v) for v in s]
        return units, raw

    def _counts(self, d: Dim, units: dict[int, LayerUnits], current: dict[int, int], wanted: Any) -> dict[int, int]:
        if self.mode == "uniform":
            return dict(wanted)
        ref = self.references.setdefault(d.kind, {i: layer_reference(u.scores) for i, u in units.items()})
        counts = per_layer_counts(units, current, wanted, d.floor, ref)
        if d.kind == "mlp" and self.multiple_of > 1 and wanted == d.total_target:
            counts = round_counts(counts, current, d.floor, self.multiple_of, wanted)
            self.rounded.add(d.kind)
        return counts

    def _remember_first(self, kind: str, raw: dict[int, list[float]]) -> None:
        """The unpruned model's scores (original indices) go into the plan; MLP ones as per-layer summaries
        to keep the plan small."""
        key = _FIRST_SCORES_KEY[kind]
        if key in self.first_scores:
            return
        if kind == "mlp":
            self.first_scores[key] = {str(i): {"min": min(v), "mean": sum(v) / len(v), "max": max(v)}
                                      for i, v in raw.items()}
        else:
            self.first_scores[key] = {str(i): v for i, v in raw.items()}


# The plan's names for each dimension's first scores (part of the plan's JSON format).
_FIRST_SCORES_KEY = {"mlp": "mlp", "query-heads": "query_heads", "kv-groups": "kv_groups"}

# The plan history's names for the adapter's config-field widths (part of the plan's JSON format).
_HISTORY_NAMES = {"num_attention_heads": "heads", "num_key_value_heads": "kv_heads", "intermediate_size": "channels"}


def width_counts(adapter: ModelAdapter, layer: nn.Module) -> dict[str, int]:
    return {_HISTORY_NAMES[k]: v for k, v in adapter.layer_widths(layer).items()}
