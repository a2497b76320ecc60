"""Spending a budget across sub-layers: a pure greedy over the error curves.

Every step takes, among all sub-layers, the cut (from a sub-layer's current kept count to any smaller allowed
one) with the least error added per unit of resource removed; a cut that removes more than is still needed
is charged as if it removed only what is needed, so the last step does not overshoot for nothing. Taking the
best ratio over every smaller count (not only the next one) walks the lower convex hull of each curve, which
is what makes a greedy choice sound for a separable budget.

Families restrict the allowed counts: ``mixed`` (any: widths and drops together), ``depth`` (all or nothing,
i.e. LLM-Drop-like sub-layer drops chosen by the Fisher error), ``width`` (never 0).
"""

from __future__ import annotations

from functools import partial

from prunekit.compress.budget import SublayerCost
from prunekit.compress.curves import Curve
from prunekit.compress.stats import Sublayer

FAMILIES: tuple[str, ...] = ("mixed", "depth", "width")


def _allowed(curve: Curve, family: str) -> list[int]:
    n = curve.ks[0]
    if family == "depth":
        return [k for k in curve.ks if k in (0, n)]
    if family == "width":
        return [k for k in curve.ks if k > 0]
    return list(curve.ks)


def allocate(curves: dict[Sublayer, Curve], costs: dict[Sublayer, SublayerCost], need: int, key: str,
             family: str = "mixed") -> dict[Sublayer, int]:
    """Kept count per sub-layer (only those cut) removing at least `need` of `key` (or as close as the
    family allows); errors from the curves."""
    options = {s: _allowed(c, family) for s, c in curves.items()}
    err = {s: dict(zip(c.ks, c.err)) for s, c in curves.items()}
    removed_by = {s: partial(costs[s].removed, key, alive=c.ks[0]) for s, c in curves.items()}
    cur = {s: c.ks[0] for s, c in curves.items()}
    done = 0
    while done < need:
        left = need - done
        best: tuple[float, Sublayer, int] | None = None
        for s, ks in options.items():
            base_cost, base_err = removed_by[s](cur[s]), err[s][cur[s]]
            for k in ks:
                dc = removed_by[s](k) - base_cost
                if k >= cur[s] or dc <= 0:
                    continue
                ratio = (err[s][k] - base_err) / min(dc, left)
                if best is None or ratio < best[0]:
                    best = (ratio, s, k)
        if best is None:
            break  # the family cannot remove more
        _, s, k = best
        done += removed_by[s](k) - removed_by[s](cur[s])
        cur[s] = k
    return {s: k for s, k in cur.items() if k != curves[s].ks[0]}


def _mlp_curves(curves: dict[Sublayer, Curve]) -> tuple[dict[Sublayer, Curve], list[int]]:
    """The MLPs' curves, and the kept counts every one of them allows, largest first."""
    mlps = {s: c for s, c in curves.items() if s[1] == "mlp"}
    shared = set.intersection(*(set(c.ks) for c in mlps.values())) if mlps else set()
    return mlps, sorted(shared, reverse=True)


def uniform_mlp(curves: dict[Sublayer, Curve], costs: dict[Sublayer, SublayerCost], need: int,
                key: str) -> dict[Sublayer, int]:
    """TransAct-uniform: every MLP keeps the same count (the largest allowed one that removes enough)."""
    mlps, shared = _mlp_curves(curves)
    if not mlps or key != "params":
        return {}
    for k in shared:
        if sum(costs[s].removed(key, k, c.ks[0]) for s, c in mlps.items()) >= need:
            return {s: k for s, c in mlps.items() if k != c.ks[0]}
    return {s: shared[-1] for s in mlps}


def near_uniform_mlp(curves: dict[Sublayer, Curve], costs: dict[Sublayer, SublayerCost], need: int,
                     key: str) -> dict[Sublayer, int]:
    """`uniform_mlp`, with as many MLPs as the budget allows given back one step (the next larger shared
    count), those whose curves say that step costs most first. One step of every MLP at once can remove far
    more than needed (Gemma-3-270m at params=0.9: 10.7% for 10%); here widths differ by at most one step and
    the removed total lands just above `need`."""
    counts = uniform_mlp(curves, costs, need, key)
    if not counts:
        return counts
    mlps, shared = _mlp_curves(curves)
    k = next(iter(counts.values()))
    larger = min((j for j in shared if j > k), default=None)
    if larger is None:
        return counts
    err = {s: dict(zip(c.ks, c.err)) for s, c in mlps.items()}
    spare = sum(costs[s].removed(key, j, mlps[s].ks[0]) for s, j in counts.items()) - need

    def step(s: Sublayer) -> int:
        return costs[s].removed(key, k, mlps[s].ks[0]) - costs[s].removed(key, larger, mlps[s].ks[0])

    for s in sorted(counts, key=lambda s: err[s][larger] - err[s][k]):  # most error saved first
        if step(s) <= spare:
            spare -= step(s)
            counts[s] = larger
    return {s: c for s, c in counts.items() if c != mlps[s].ks[0]}
