"""TransAct-style width pruning: rank attention heads and MLP channels by the activations flowing through them
on calibration data, and remove the weakest in several shots, giving a smaller dense model with the same
hidden size.

Lifecycle (this module): `ActivationCollector` hooks the inputs of `o_proj` and `down_proj` of every layer
(through the adapter) and runs calibration with `CalibrationRunner`; the scoring math is in `importance.py`;
the planners below turn scores into kept indices; `width_surgery.apply_widths` slices the weights.

Units. Every width is counted in *units* that can be removed one at a time without breaking GQA:
  * MLP: one intermediate channel.
  * heads, ``head_mode="kv-groups"``: one KV group = a KV head together with the g query heads sharing it.
    `heads_keep` then counts KV groups per layer (a ratio is a fraction of the KV groups).
  * heads, ``head_mode="query-heads"``: one "slice" = one query head from *every* KV group (the weakest head
    left in each group), so num_heads % num_kv_heads == 0 always holds and the KV heads all stay.
    `heads_keep` then counts query heads per layer (a multiple of num_kv_heads; a ratio is a fraction of
    the query heads and must land on such a multiple).
A ratio r becomes round(r * width) units (halves round up); it must give at least one unit.

Modes. ``uniform``: every layer keeps the same number of units (TransAct). ``per-layer``: the same total
number of units as uniform would keep, chosen by one global ranking across layers, with a per-layer floor of
max(1, ceil(min_layer_keep * original units)). Scores are normalised per layer before the global ranking by
dividing by the *median* unit score of that layer in the unpruned model (taken at the first shot and kept
for later shots). Why: raw activation norms differ by orders of magnitude between layers (the residual
stream grows with depth), so unnormalised ranking strips whole layers; the mean is dominated by the few
outlier channels LLMs have in some layers, which makes every other channel of such a layer look negligible
(on SmolLM2-135M, MLP keep 75% one-shot: wiki perplexity 87.7 with mean vs 82.0 with median, 8 x 128
calibration tokens, 4 x 256 eval tokens); and a reference re-taken after each shot drifts up in layers
already pruned hard (their weakest units are gone), so they keep losing units shot after shot (4 shots:
about 80 re-taken vs 75.1 fixed). With only a few units per layer (e.g. 3 KV groups) the median is the
middle unit, which makes a one-shot per-layer plan close to uniform.

Shots. The target is reached in `shots` steps on a geometric schedule (each shot removes about the same
*fraction* of what is left, like iterative magnitude pruning: after shot s of K the width is
round(W * (T / W) ** (s / K)), and exactly T after the last). `uniform` schedules every layer's width;
`per-layer` schedules the total. Between shots the partly pruned model is re-scored. A shot whose schedule
removes nothing is skipped (no scoring, no `between_shots` call).

Multiples. `multiple_of=m` (MLP channels only; heads are whole units already) makes every final MLP width a
multiple of m, because matrix kernels run such shapes faster (tensor-core tiles on GPUs, vector widths on
CPUs) and a 1399-wide layer can be slower than a 1408-wide one. Uniform: the per-layer target is rounded to
the nearest multiple (never above the layer's width). Per-layer: the shot that reaches the final total
rounds the ranking's counts with `_round_counts` (each layer down to a multiple, then blocks of m back to
the layers that lost most), so the total stays within m/2 of the target. Intermediate shots are not rounded.

Width pruning edits the model in place and returns a `PruningPlan` whose `widths` hold kept indices into the
ORIGINAL layers (composed across shots), so `surgery.apply_plan(plan)` on a fresh copy of the original
model rebuilds the same model (and `apply_plan` on the already narrowed model changes nothing, see
`width_surgery`). Layer keys are the model's layer indices at the time of the call (layers whose attention
or MLP was already removed are skipped for that sub-layer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.calibration import CalibrationRunner
from prunekit.data import CalibrationData
from prunekit.errors import PlanError
from prunekit.importance import (
    SCORERS,
    Scorer,
    SquaredSums,
    get_scorer,
    head_units,
    kv_group_units,
    removal_order,
    unit_scores,
    unit_terms,
    weight_columns,
)
from prunekit.plans import LayerWidth, PruningPlan
from prunekit.surgery import count_parameters, has_attention, has_mlp, refresh_config
from prunekit.width_surgery import apply_widths, attention_shape, mlp_width

Keep = float | int  # a float is a ratio of the current width (0 < r <= 1), an int an absolute count
Mode = Literal["uniform", "per-layer"]
HeadMode = Literal["kv-groups", "query-heads"]
MODES: tuple[str, ...] = ("uniform", "per-layer")
HEAD_MODES: tuple[str, ...] = ("kv-groups", "query-heads")
SCHEDULE = "geometric"
NORMALISATION = "original-layer-median"


# --- collection -----------------------------------------------------------------------------------------------
@dataclass
class LayerActivations:
    """Per-column squared sums of one layer's `o_proj` input (attention) and `down_proj` input (MLP).

    `attn_weight` / `mlp_weight`: what weight-using scorers need of `o_proj` / `down_proj` when the module
    holds no weights any more (a streamed layer is released after its pass): the projection's
    `importance.weight_columns`. None means "read the module's own weight"."""

    attn: SquaredSums | None = None
    mlp: SquaredSums | None = None
    attn_weight: torch.Tensor | None = None
    mlp_weight: torch.Tensor | None = None


class WidthCollector(Protocol):
    """Gathers `LayerActivations` for every layer of the model as it is now. `widths` are the current kept
    widths as ORIGINAL indices (what `width_prune` has cut so far); an in-memory model is already narrowed
    and ignores them, a streamed one needs them to cut each layer as it reads it from the files."""

    def collect(self, *, attn: bool = True, mlp: bool = True, desc: str = "width scoring",
                widths: Mapping[int, LayerWidth] | None = None) -> dict[int, LayerActivations]: ...


class ActivationCollector:
    """Runs calibration data through the model with pre-hooks on `o_proj` and `down_proj`.

    The hooks only remember the batch's input tensor; the layer observer of `CalibrationRunner`, which is
    given the batch's attention mask, folds it into the running sums, so padding is excluded without
    touching the runner. Reusable across shots (the model may be narrowed in between)."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, calib: CalibrationData, *, batch_size: int = 4,
                 progress: bool = True):
        # Every layer changes between shots, so re-runs always start at layer 0: remember no layer inputs
        # beyond the minimum the runner keeps.
        self.runner = CalibrationRunner(model, adapter, calib, batch_size=batch_size, state_budget_bytes=0,
                                        progress=progress)
        self.adapter = adapter

    def collect(self, *, attn: bool = True, mlp: bool = True, desc: str = "width scoring",
                widths: Mapping[int, LayerWidth] | None = None) -> dict[int, LayerActivations]:
        stats: dict[int, LayerActivations] = {}
        pending: dict[int, dict[str, torch.Tensor]] = {}
        handles = []
        for i, layer in enumerate(self.adapter.layers()):
            pending[i] = {}
            stats[i], hs = watch_layer(self.adapter, layer, pending[i], attn=attn, mlp=mlp)
            handles += hs

        def observe(i: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                    mask: torch.Tensor | None) -> None:
            if i in stats:
                fold_pending(stats[i], pending[i], mask)

        try:
            self.runner.run([observe], start_layer=0, desc=desc)
        finally:
            for h in handles:
                h.remove()
        return stats


def watch_layer(adapter: ModelAdapter, layer: nn.Module, pending: dict[str, torch.Tensor], *, attn: bool = True,
                mlp: bool = True, keep_weights: bool = False) -> tuple[LayerActivations, list[Any]]:
    """Empty statistics for one layer plus pre-hooks (returned, for removal) that put the batch's `o_proj` /
    `down_proj` input into `pending["attn"]` / `pending["mlp"]`; `fold_pending` then adds them with the
    batch's mask. Used by the in-memory `ActivationCollector` and the streamed `WidthStatsObserver`.
    `keep_weights`: also keep the projections' `weight_columns`, for when the layer's weights will be gone
    by the time the scorer runs (streaming)."""
    st = LayerActivations()
    handles: list[Any] = []

    def remember(what: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            pending[what] = args[0].detach()
        return hook

    if attn and has_attention(adapter, layer):
        o = adapter.attn_projections(layer)[3]
        st.attn = SquaredSums(o.in_features, device=o.weight.device)
        handles.append(o.register_forward_pre_hook(remember("attn")))
        if keep_weights:
            st.attn_weight = weight_columns(o.weight).cpu()
    if mlp and has_mlp(adapter, layer):
        down = adapter.mlp_projections(layer)[2]
        st.mlp = SquaredSums(down.in_features, device=down.weight.device)
        handles.append(down.register_forward_pre_hook(remember("mlp")))
        if keep_weights:
            st.mlp_weight = weight_columns(down.weight).cpu()
    return st, handles


def fold_pending(st: LayerActivations, pending: dict[str, torch.Tensor], mask: torch.Tensor | None) -> None:
    """Add the inputs `watch_layer`'s hooks remembered for one batch to the sums, padding excluded."""
    for what, acc in (("attn", st.attn), ("mlp", st.mlp)):
        x = pending.pop(what, None)
        if acc is not None and x is not None:
            acc.update(x, mask)


# --- targets --------------------------------------------------------------------------------------------------
def _round_half_up(x: float) -> int:
    # A tiny tolerance so that e.g. 0.6667 * 9 = 6.0003 and 0.7 * 10 = 6.999999 land on the intended count.
    return int(math.floor(x + 0.5 + 1e-9))


def _resolve(keep: Keep, width: int, what: str) -> int:
    """Units to keep out of `width` for a ratio or count `keep` (PlanError when impossible)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise PlanError(f"{what}: keep target must be a ratio (float) or a count (int), got {keep!r}")
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise PlanError(f"{what}: a keep ratio must be in (0, 1], got {keep}")
        n = _round_half_up(keep * width)
        if n < 1:
            raise PlanError(f"{what}: keep ratio {keep} of {width} rounds to 0; at least 1 must remain")
        return n
    if keep < 1:
        raise PlanError(f"{what}: keep count must be at least 1, got {keep}")
    if keep > width:
        raise PlanError(f"{what}: cannot keep {keep} when only {width} remain")
    return int(keep)


@dataclass
class _Dim:
    """One pruned dimension (MLP channels, KV groups or query-head slices) across layers."""

    kind: Literal["mlp", "kv-groups", "query-heads"]
    layers: list[int]  # layer indices that have this sub-layer
    start: dict[int, int]  # units per layer before pruning
    target: dict[int, int]  # units per layer after pruning (uniform) / used for the total (per-layer)
    floor: dict[int, int] = field(default_factory=dict)

    @property
    def total_target(self) -> int:
        return sum(self.target.values())

    @property
    def total_start(self) -> int:
        return sum(self.start.values())


def _units(adapter: ModelAdapter, layer: nn.Module, kind: str) -> int:
    if kind == "mlp":
        return mlp_width(adapter, layer)
    nh, nkv = attention_shape(adapter, layer)
    return nkv if kind == "kv-groups" else nh // nkv


def _round_to_multiple(n: int, start: int, m: int, what: str) -> int:
    """`n` rounded to the nearest multiple of `m` (halves up), never above the largest multiple of `m` that
    fits in `start`; PlanError when no multiple of `m` fits."""
    if m <= 1:
        return n
    top = (start // m) * m
    if top < m:
        raise PlanError(f"{what}: a multiple of {m} channels cannot be kept from {start}; lower --multiple-of")
    return max(m, min(top, _round_half_up(n / m) * m))


def _round_counts(counts: dict[int, int], current: dict[int, int], floor: dict[int, int], m: int,
                  total: int) -> dict[int, int]:
    """Per-layer counts of a global ranking turned into multiples of `m` with the total kept within m/2 of
    `total` where the floors allow: every layer is first rounded down to a multiple (but not below its floor
    rounded up), then blocks of `m` go back to the layers that lost the most (largest remainder; ties to the
    lower layer). Layers narrower than `m` keep their count."""
    lo: dict[int, int] = {}
    hi: dict[int, int] = {}
    out = dict(counts)
    for i, c in counts.items():
        top = (current[i] // m) * m
        if top < m:
            continue
        hi[i] = top
        lo[i] = min(top, max(m, -(-floor.get(i, 1) // m) * m))
        out[i] = min(hi[i], max(lo[i], (c // m) * m))
    need = _round_half_up((total - sum(out.values())) / m)
    if need > 0:
        order = sorted((i for i in hi if out[i] + m <= hi[i]), key=lambda i: (-(counts[i] - out[i]), i))
        for i in order[:need]:
            out[i] += m
    elif need < 0:
        order = sorted((i for i in hi if out[i] - m >= lo[i]), key=lambda i: (counts[i] - out[i], i))
        for i in order[:-need]:
            out[i] -= m
    return out


def _build_dims(adapter: ModelAdapter, mlp_keep: Keep | None, heads_keep: Keep | None, head_mode: str,
                mode: str, min_layer_keep: float, multiple_of: int = 1) -> list[_Dim]:
    layers = adapter.layers()
    dims: list[_Dim] = []
    if mlp_keep is not None:
        idx = [i for i, layer in enumerate(layers) if has_mlp(adapter, layer)]
        if not idx:
            raise PlanError("the model has no MLP left to narrow")
        start = {i: mlp_width(adapter, layers[i]) for i in idx}
        target = {}
        for i in idx:
            what = f"MLP keep target (layer {i}, {start[i]} channels)"
            target[i] = _round_to_multiple(_resolve(mlp_keep, start[i], what), start[i], multiple_of, what)
        dims.append(_Dim("mlp", idx, start, target))
    if heads_keep is not None:
        idx = [i for i, layer in enumerate(layers) if has_attention(adapter, layer)]
        if not idx:
            raise PlanError("the model has no attention left to narrow")
        start, target = {}, {}
        for i in idx:
            nh, nkv = attention_shape(adapter, layers[i])
            if head_mode == "kv-groups":
                start[i] = nkv
                target[i] = _resolve(heads_keep, nkv, f"heads keep target (layer {i}, {nkv} KV groups)")
            else:
                n = _resolve(heads_keep, nh, f"heads keep target (layer {i}, {nh} query heads)")
                if n % nkv:
                    lo, hi = (n // nkv) * nkv, (n // nkv + 1) * nkv
                    options = " or ".join(str(v) for v in (lo, hi) if 0 < v <= nh)
                    raise PlanError(
                        f"the heads keep target keeps {n} of {nh} query heads in layer {i}, which is not a multiple of its "
                        f"{nkv} KV heads (query-heads mode removes heads evenly from every group); keep {options}"
                    )
                start[i], target[i] = nh // nkv, n // nkv
        dims.append(_Dim(head_mode, idx, start, target))  # type: ignore[arg-type]
    if mode == "per-layer":
        for d in dims:
            d.floor = {i: min(d.start[i], max(1, math.ceil(min_layer_keep * d.start[i] - 1e-9))) for i in d.layers}
            if sum(d.floor.values()) > d.total_target:
                raise PlanError(
                    f"the {d.kind} target keeps {d.total_target} units in all, below the per-layer floors "
                    f"({sum(d.floor.values())}); lower min_layer_keep or keep more"
                )
    return dims


def geometric_schedule(start: int, target: int, shots: int) -> list[int]:
    """Widths after each of `shots` shots from `start` to `target`: round(start * (target/start)^(s/shots)),
    non-increasing, ending exactly at `target`."""
    out: list[int] = []
    prev = start
    for s in range(1, shots + 1):
        w = target if s == shots else _round_half_up(start * (target / start) ** (s / shots))
        w = min(prev, max(target, w))
        out.append(w)
        prev = w
    return out


# --- planning one shot ----------------------------------------------------------------------------------------
@dataclass
class _LayerUnits:
    """One layer's removable units in removal order (least important first), with their scores."""

    scores: torch.Tensor  # [units] float64, ascending
    keep_for: Callable[[int], tuple[list[int], list[int]] | list[int]]  # n units -> kept current indices


def _mlp_units(scorer: Scorer, acc: SquaredSums, weight: torch.Tensor) -> tuple[_LayerUnits, torch.Tensor]:
    scores = unit_scores(scorer, acc.sums, weight if scorer.uses_weight else None,
                         torch.arange(acc.sums.shape[0]).unsqueeze(1))
    order = removal_order(scores)
    c = len(order)

    def keep_for(n: int) -> list[int]:
        return sorted(int(i) for i in order[c - n:])

    return _LayerUnits(scores.cpu()[order], keep_for), scores


def _kv_group_units(scorer: Scorer, acc: SquaredSums, weight: torch.Tensor, nh: int, nkv: int,
                    hd: int) -> tuple[_LayerUnits, torch.Tensor]:
    scores = unit_scores(scorer, acc.sums, weight if scorer.uses_weight else None, kv_group_units(nh, nkv, hd))
    order = removal_order(scores)
    g = nh // nkv

    def keep_for(n: int) -> tuple[list[int], list[int]]:
        kv = sorted(int(k) for k in order[nkv - n:])
        return [k * g + j for k in kv for j in range(g)], kv

    return _LayerUnits(scores.cpu()[order], keep_for), scores


def _query_head_units(scorer: Scorer, acc: SquaredSums, weight: torch.Tensor, nh: int, nkv: int,
                      hd: int) -> tuple[_LayerUnits, torch.Tensor]:
    g = nh // nkv
    terms = unit_terms(scorer, acc.sums, weight if scorer.uses_weight else None, head_units(nh, hd)).cpu()
    per_group = terms.view(nkv, g)
    # Within each group, heads least important first (stable: ties go to the lower head index).
    order = torch.stack([removal_order(row) for row in per_group])  # [nkv, g]
    # Slice j = the j-th weakest head of every group; its score is `finish` of the summed terms, and since
    # each group's terms are sorted the slice scores come out ascending.
    slice_scores = scorer.finish(torch.gather(per_group, 1, order).sum(0))

    def keep_for(n: int) -> tuple[list[int], list[int]]:
        heads = sorted(int(k * g + j) for k in range(nkv) for j in order[k, g - n:])
        return heads, list(range(nkv))

    return _LayerUnits(slice_scores, keep_for), scorer.finish(terms)


def layer_reference(scores: torch.Tensor) -> float:
    """The per-layer normaliser: the median unit score (the mean of the two middle ones for an even count;
    the mean, then 1, when that is 0)."""
    if not len(scores):
        return 1.0
    s = scores.to(torch.float64)
    for ref in (float(torch.quantile(s, 0.5)), float(s.mean())):
        if ref > 0:
            return ref
    return 1.0


def _per_layer_counts(units: dict[int, _LayerUnits], current: dict[int, int], total: int,
                      floor: dict[int, int], reference: dict[int, float]) -> dict[int, int]:
    """Global ranking: remove the lowest normalised units (score / the layer's `reference`) across layers
    until `total` units remain, never taking a layer below its floor."""
    remove = sum(current.values()) - total
    cands: list[tuple[float, int, int]] = []
    for i, u in units.items():
        norm = u.scores / reference[i]
        cands += [(float(s), i, r) for r, s in enumerate(norm)]
    # Ascending normalised score; ties to the lower layer, then the unit's own removal rank, so each
    # layer's units are taken in their removal order.
    cands.sort()
    removed = {i: 0 for i in units}
    for _, i, r in cands:
        if remove <= 0:
            break
        if r != removed[i] or current[i] - removed[i] <= floor[i]:
            continue
        removed[i] += 1
        remove -= 1
    return {i: current[i] - removed[i] for i in units}


# --- the loop ---------------------------------------------------------------------------------------------------
def _describe_keep(keep: Keep | None) -> Any:
    return keep if keep is None else (float(keep) if isinstance(keep, float) else int(keep))


def check_width_options(*, mlp_keep: Keep | None, heads_keep: Keep | None, mode: str, shots: int, scorer: str,
                        head_mode: str, min_layer_keep: float, multiple_of: int) -> None:
    """Raise `PlanError` for options that are wrong whatever the model (callers check before loading one);
    targets that depend on the model's widths are checked by `width_prune`."""
    if mode not in MODES:
        raise PlanError(f"unknown width mode {mode!r}; choose one of {', '.join(MODES)}")
    if head_mode not in HEAD_MODES:
        raise PlanError(f"unknown head mode {head_mode!r}; choose one of {', '.join(HEAD_MODES)}")
    if scorer not in SCORERS:
        raise PlanError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise PlanError(f"shots must be a positive integer, got {shots!r}")
    if not 0 <= min_layer_keep <= 1:
        raise PlanError(f"min_layer_keep must be in [0, 1], got {min_layer_keep}")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise PlanError(f"multiple_of must be a positive integer, got {multiple_of!r}")
    if mlp_keep is None and heads_keep is None:
        raise PlanError("nothing to prune: give an MLP keep target, an attention-heads keep target, or both")
    for name, keep in (("MLP", mlp_keep), ("heads", heads_keep)):
        if keep is not None:
            _resolve(keep, 1 << 62, f"{name} keep target")  # the checks that need no layer width


def width_prune(model: nn.Module, adapter: ModelAdapter, calib: CalibrationData, *,
                mlp_keep: Keep | None = None, heads_keep: Keep | None = None, mode: Mode = "uniform",
                shots: int = 8, scorer: str = "activation", head_mode: HeadMode = "kv-groups",
                min_layer_keep: float = 0.1, multiple_of: int = 1, batch_size: int = 4,
                between_shots: Callable[[nn.Module, int], None] | None = None,
                progress: bool = True, collector: WidthCollector | None = None) -> PruningPlan:
    """Narrow `model` in place to the kept widths and return the plan (kept indices into the original layers).

    `mlp_keep` / `heads_keep`: a float ratio (0 < r <= 1) of each layer's width or an int count per layer
    (see the module docstring for what `heads_keep` counts in each `head_mode`); None leaves that part alone.
    `between_shots(model, shot)` is called after each shot that changed the model (1-based shot number),
    with the config already refreshed, e.g. for recovery training. Bad targets raise `PlanError` before the
    model is touched.

    `collector`: where the activation statistics come from; default: an `ActivationCollector` running the
    model in memory. A layer-streamed run (`prunekit.stream.StreamedWidthCollector`) passes its own and a
    meta-device skeleton as `model`: the planning and the surgery here then only touch shapes."""
    check_width_options(mlp_keep=mlp_keep, heads_keep=heads_keep, mode=mode, shots=shots, scorer=scorer,
                        head_mode=head_mode, min_layer_keep=min_layer_keep, multiple_of=multiple_of)
    dims = _build_dims(adapter, mlp_keep, heads_keep, head_mode, mode, min_layer_keep, multiple_of)
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
        if has_attention(adapter, layer):
            nh, nkv = attention_shape(adapter, layer)
            orig_heads[i], orig_kv[i] = list(range(nh)), list(range(nkv))
        if has_mlp(adapter, layer):
            orig_ch[i] = list(range(mlp_width(adapter, layer)))

    # Per-shot targets: per layer (uniform) or the total (per-layer).
    schedules: dict[str, Any] = {}
    for d in dims:
        if mode == "uniform":
            schedules[d.kind] = {i: geometric_schedule(d.start[i], d.target[i], shots) for i in d.layers}
        else:
            schedules[d.kind] = geometric_schedule(d.total_start, d.total_target, shots)

    if collector is None:
        collector = ActivationCollector(model, adapter, calib, batch_size=batch_size, progress=progress)
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
        current = {d.kind: {i: _units(adapter, layers[i], d.kind) for i in d.layers} for d in dims}
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
            units: dict[int, _LayerUnits] = {}
            raw: dict[int, list[float]] = {}
            for i in d.layers:
                layer = layers[i]
                st = stats[i]
                if d.kind == "mlp":
                    down = adapter.mlp_projections(layer)[2]
                    wt = st.mlp_weight if st.mlp_weight is not None else down.weight
                    u, s = _mlp_units(sc, st.mlp, wt)  # type: ignore[arg-type]
                else:
                    nh, nkv = attention_shape(adapter, layer)
                    o = adapter.attn_projections(layer)[3]
                    wt = st.attn_weight if st.attn_weight is not None else o.weight
                    build = _kv_group_units if d.kind == "kv-groups" else _query_head_units
                    u, s = build(sc, st.attn, wt, nh, nkv, hd)  # type: ignore[arg-type]
                units[i] = u
                raw[i] = [float(v) for v in s]
            if mode == "uniform":
                counts = wanted[d.kind]
            else:
                ref = references.setdefault(d.kind, {i: layer_reference(u.scores) for i, u in units.items()})
                counts = _per_layer_counts(units, current[d.kind], wanted[d.kind], d.floor, ref)
                if d.kind == "mlp" and multiple_of > 1 and wanted[d.kind] == d.total_target:
                    counts = _round_counts(counts, current[d.kind], d.floor, multiple_of, wanted[d.kind])
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
            "widths": {str(i): _width_counts(adapter, layers[i]) for i in range(len(layers))},
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
    return PruningPlan(
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


def _width_counts(adapter: ModelAdapter, layer: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    if has_attention(adapter, layer):
        out["heads"], out["kv_heads"] = attention_shape(adapter, layer)
    if has_mlp(adapter, layer):
        out["channels"] = mlp_width(adapter, layer)
    return out
