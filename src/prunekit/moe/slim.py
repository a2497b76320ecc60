"""Expert slimming (TransAct inside the experts): narrow every expert of each MoE layer to the same number of
intermediate channels, each expert its own, ranked by the gate-weighted activation energy of the tokens routed
to it (`moe.choose.choose_expert_widths`), in several shots with re-scoring in between; a shared expert keeps the same
fraction of its own channels. The plan holds ORIGINAL channel indices, like TransAct's."""

from __future__ import annotations

import math

from torch import nn

from prunekit.adapters.moe import MoEAdapter
from prunekit.data import CalibrationData
from prunekit.engine.sources import LayerSource, as_source
from prunekit.engine.sums import Sums
from prunekit.errors import PlanError
from prunekit.moe.choose import check_moe, choose_expert_widths
from prunekit.moe.stats import collect_expert_stats
from prunekit.moe.surgery import EXPERT_WIDTH_MULTIPLE
from prunekit.plans import LayerWidth, PruningPlan
from prunekit.surgery import apply_widths, count_parameters, refresh_config
from prunekit.width.targets import geometric_schedule, resolve_keep, round_half_up, round_to_multiple

Counts = dict[int, tuple[int, int | None]]


def check_slim_options(*, heads_keep: object, mode: str, scorer: str) -> None:
    """What expert slimming does not do (yet), refused before any work."""
    if heads_keep is not None:
        raise PlanError("on a Mixture-of-Experts model, width narrows the experts only (--mlp-keep); "
                        "--heads-keep is not supported there yet")
    if mode != "uniform" or scorer != "activation":
        raise PlanError("on a Mixture-of-Experts model, width keeps one width for every layer's experts "
                        "(--uniform) ranked by routed activations (--scorer activation)")


def slim_targets(adapter: MoEAdapter, keep: float | int, multiple_of: int) -> Counts:
    """Final (expert channels, shared channels or None) of every MoE layer for `--mlp-keep keep`: a ratio or a
    count of each expert's channels, rounded to `multiple_of` (and to `EXPERT_WIDTH_MULTIPLE`); the shared expert keeps the same fraction
    (rounded to `multiple_of` where one fits)."""
    out: Counts = {}
    for i in adapter.moe_layers():
        layer = adapter.layers()[i]
        width = adapter.expert_width(layer)
        k = round_to_multiple(resolve_keep(keep, width, "MLP keep target"), width,
                              math.lcm(multiple_of, EXPERT_WIDTH_MULTIPLE), f"layer {i}'s experts")
        shared = adapter.shared_projections(layer)
        k_shared = None
        if shared is not None:
            s = shared[1].out_features
            k_shared = max(1, round_half_up(s * k / width))
            if multiple_of <= s:
                k_shared = round_to_multiple(k_shared, s, multiple_of, f"layer {i}'s shared expert")
        out[i] = (k, k_shared)
    return out


def slim_experts(model: nn.Module | LayerSource, adapter: MoEAdapter, calib: CalibrationData, *,
                 mlp_keep: float | int, shots: int = 8, multiple_of: int = 64, batch_size: int = 4,
                 sums: Sums | None = None, progress: bool = True) -> PruningPlan:
    """Narrow every MoE layer's experts in place (shots: a geometric schedule to the target) and return the plan
    in ORIGINAL indices."""
    ad = check_moe(adapter, "expert slimming")
    source = as_source(model, ad)
    layers = ad.layers()
    final = slim_targets(ad, mlp_keep, multiple_of)
    start = {i: (ad.expert_width(layers[i]), _shared_width(ad, i)) for i in final}
    schedule = {i: (_aligned(geometric_schedule(start[i][0], k, shots), k),
                    None if ks is None else geometric_schedule(start[i][1], ks, shots))  # type: ignore[arg-type]
                for i, (k, ks) in final.items()}
    origin = {i: ([[*range(w)] for _ in range(ad.num_experts(layers[i]))], None if s is None else [*range(s)])
              for i, (w, s) in start.items()}
    before = count_parameters(ad.model)
    history: list[dict[str, object]] = []
    for shot in range(shots):
        stats = collect_expert_stats(source, calib, adapter=ad, batch_size=batch_size, sums=sums, progress=progress)
        counts = {i: (e[shot], None if s is None else s[shot]) for i, (e, s) in schedule.items()}
        widths = choose_expert_widths(stats, counts)
        apply_widths(ad, widths)
        for i, w in widths.items():
            kept, shared = origin[i]
            origin[i] = ([[row[c] for c in now] for row, now in zip(kept, w.expert_channels or [])],
                         None if shared is None else [shared[c] for c in w.shared_channels or range(len(shared))])
        # A streamed source reads every later pass's layers already cut to these (original) channels.
        source.set_widths({i: LayerWidth(expert_channels=e, shared_channels=s) for i, (e, s) in origin.items()})
        history.append({"shot": shot + 1, "parameters": count_parameters(ad.model),
                        "widths": {str(i): ad.layer_widths(layers[i]) for i in range(len(layers))}})
    refresh_config(ad)
    plan_widths = {i: LayerWidth(expert_channels=e, shared_channels=s) for i, (e, s) in origin.items()}
    return PruningPlan(widths=plan_widths, method="expert-slim",
                       options={"mlp_keep": mlp_keep, "shots": shots, "multiple_of": multiple_of,
                                "batch_size": batch_size, "parameters_before": before,
                                "parameters_after": count_parameters(ad.model)},
                       history=history, calibration=calib.describe(), model={"num_hidden_layers": ad.num_layers})


def _aligned(widths: list[int], target: int) -> list[int]:
    """Every shot's expert width rounded up to `EXPERT_WIDTH_MULTIPLE` (the kernels need it), the last exact."""
    m = EXPERT_WIDTH_MULTIPLE
    return [w if w == target else -(-w // m) * m for w in widths]


def _shared_width(adapter: MoEAdapter, i: int) -> int | None:
    shared = adapter.shared_projections(adapter.layers()[i])
    return None if shared is None else shared[1].out_features
