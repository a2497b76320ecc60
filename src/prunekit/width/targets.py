"""Width targets: keep ratios and counts resolved per layer, the dimensions being pruned, the geometric
shot schedule, rounding to multiples, and the option checks that need no model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.errors import PlanError
from prunekit.width.importance import SCORERS

Keep = float | int  # a float is a ratio of the current width (0 < r <= 1), an int an absolute count
Mode = Literal["uniform", "per-layer"]
HeadMode = Literal["kv-groups", "query-heads"]
MODES: tuple[str, ...] = ("uniform", "per-layer")
HEAD_MODES: tuple[str, ...] = ("kv-groups", "query-heads")


def round_half_up(x: float) -> int:
    # A tiny tolerance so that e.g. 0.6667 * 9 = 6.0003 and 0.7 * 10 = 6.999999 land on the intended count.
    return int(math.floor(x + 0.5 + 1e-9))


def resolve_keep(keep: Keep, width: int, what: str) -> int:
    """Units to keep out of `width` for a ratio or count `keep` (PlanError when impossible)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise PlanError(f"{what}: keep target must be a ratio (float) or a count (int), got {keep!r}")
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise PlanError(f"{what}: a keep ratio must be in (0, 1], got {keep}")
        n = round_half_up(keep * width)
        if n < 1:
            raise PlanError(f"{what}: keep ratio {keep} of {width} rounds to 0; at least 1 must remain")
        return n
    if keep < 1:
        raise PlanError(f"{what}: keep count must be at least 1, got {keep}")
    if keep > width:
        raise PlanError(f"{what}: cannot keep {keep} when only {width} remain")
    return int(keep)


@dataclass
class Dim:
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


def current_units(adapter: ModelAdapter, layer: nn.Module, kind: str) -> int:
    if kind == "mlp":
        return adapter.mlp_width(layer)
    nh, nkv = adapter.attention_shape(layer)
    return nkv if kind == "kv-groups" else nh // nkv


def round_to_multiple(n: int, start: int, m: int, what: str) -> int:
    """`n` rounded to the nearest multiple of `m` (halves up), never above the largest multiple of `m` that
    fits in `start`; PlanError when no multiple of `m` fits."""
    if m <= 1:
        return n
    top = (start // m) * m
    if top < m:
        raise PlanError(f"{what}: a multiple of {m} channels cannot be kept from {start}; lower --multiple-of")
    return max(m, min(top, round_half_up(n / m) * m))


def round_counts(counts: dict[int, int], current: dict[int, int], floor: dict[int, int], m: int,
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
    need = round_half_up((total - sum(out.values())) / m)
    if need > 0:
        order = sorted((i for i in hi if out[i] + m <= hi[i]), key=lambda i: (-(counts[i] - out[i]), i))
        for i in order[:need]:
            out[i] += m
    elif need < 0:
        order = sorted((i for i in hi if out[i] - m >= lo[i]), key=lambda i: (counts[i] - out[i], i))
        for i in order[:-need]:
            out[i] -= m
    return out


def build_dims(adapter: ModelAdapter, mlp_keep: Keep | None, heads_keep: Keep | None, head_mode: str,
                mode: str, min_layer_keep: float, multiple_of: int = 1) -> list[Dim]:
    layers = adapter.layers()
    dims: list[Dim] = []
    if mlp_keep is not None:
        idx = [i for i, layer in enumerate(layers) if adapter.has_mlp(layer)]
        if not idx:
            raise PlanError("the model has no MLP left to narrow")
        start = {i: adapter.mlp_width(layers[i]) for i in idx}
        target = {}
        for i in idx:
            what = f"MLP keep target (layer {i}, {start[i]} channels)"
            target[i] = round_to_multiple(resolve_keep(mlp_keep, start[i], what), start[i], multiple_of, what)
        dims.append(Dim("mlp", idx, start, target))
    if heads_keep is not None:
        idx = [i for i, layer in enumerate(layers) if adapter.has_attention(layer)]
        if not idx:
            raise PlanError("the model has no attention left to narrow")
        start, target = {}, {}
        for i in idx:
            nh, nkv = adapter.attention_shape(layers[i])
            if head_mode == "kv-groups":
                start[i] = nkv
                target[i] = resolve_keep(heads_keep, nkv, f"heads keep target (layer {i}, {nkv} KV groups)")
            else:
                n = resolve_keep(heads_keep, nh, f"heads keep target (layer {i}, {nh} query heads)")
                if n % nkv:
                    lo, hi = (n // nkv) * nkv, (n // nkv + 1) * nkv
                    options = " or ".join(str(v) for v in (lo, hi) if 0 < v <= nh)
                    raise PlanError(
                        f"the heads keep target keeps {n} of {nh} query heads in layer {i}, which is not a multiple of its "
                        f"{nkv} KV heads (query-heads mode removes heads evenly from every group); keep {options}"
                    )
                start[i], target[i] = nh // nkv, n // nkv
        dims.append(Dim(head_mode, idx, start, target))  # type: ignore[arg-type]
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
        w = target if s == shots else round_half_up(start * (target / start) ** (s / shots))
        w = min(prev, max(target, w))
        out.append(w)
        prev = w
    return out


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
            resolve_keep(keep, 1 << 62, f"{name} keep target")  # the checks that need no layer width
