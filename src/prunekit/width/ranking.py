"""Ranking units inside a layer (MLP channels, KV groups, query-head slices) and across layers (the
per-layer mode's global ranking on scores normalised by each layer's median)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prunekit.width.importance import (
    Scorer,
    SquaredSums,
    channel_scores,
    head_units,
    kv_group_scores,
    removal_order,
    unit_terms,
)


@dataclass
class LayerUnits:
    """One layer's removable units in removal order (least important first), with their scores."""

    scores: torch.Tensor  # [units] float64, ascending
    keep_for: Callable[[int], tuple[list[int], list[int]] | list[int]]  # n units -> kept current indices


def rank_mlp(scorer: Scorer, acc: SquaredSums, weight: torch.Tensor) -> tuple[LayerUnits, torch.Tensor]:
    scores = channel_scores(scorer, acc.sums, weight if scorer.uses_weight else None)
    order = removal_order(scores)
    c = len(order)

    def keep_for(n: int) -> list[int]:
        return sorted(int(i) for i in order[c - n:])

    return LayerUnits(scores.cpu()[order], keep_for), scores


def rank_kv_groups(scorer: Scorer, acc: SquaredSums, weight: torch.Tensor, nh: int, nkv: int,
                    hd: int) -> tuple[LayerUnits, torch.Tensor]:
    scores = kv_group_scores(scorer, acc.sums, weight if scorer.uses_weight else None, nh, nkv)
    order = removal_order(scores)
    g = nh // nkv

    def keep_for(n: int) -> tuple[list[int], list[int]]:
        kv = sorted(int(k) for k in order[nkv - n:])
        return [k * g + j for k in kv for j in range(g)], kv

    return LayerUnits(scores.cpu()[order], keep_for), scores


def rank_query_heads(scorer: Scorer, acc: SquaredSums, weight: torch.Tensor, nh: int, nkv: int,
                      hd: int) -> tuple[LayerUnits, torch.Tensor]:
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

    return LayerUnits(slice_scores, keep_for), scorer.finish(terms)


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


def per_layer_counts(units: dict[int, LayerUnits], current: dict[int, int], total: int,
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
