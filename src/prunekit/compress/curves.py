"""Error curves and refits: pure linear algebra over one sub-layer's statistics (`stats.SublayerStats`).

A sub-layer's units (MLP channels or KV groups) are ordered by TransAct's activation norm, strongest first,
and it may keep the first k of them. Whatever it keeps, its output projection is refitted by least squares
to the output it had with all of them (ridge towards the current weights), and the loss increase is the
Fisher-weighted residual tr(F R G R') (see `stats`). For every k at once, from one Cholesky factor:

    with the columns in unit order, G = L L' and M = L' W' ([in, d]), the residual of keeping the first c
    columns is the sum over rows j >= c of m_j F m_j'

(X = Q L' with Q orthonormal, so Y = X W' = Q M, and regressing Y on the first c columns of X leaves exactly
the components along q_c, q_{c+1}, ...). k = 0 is removing the sub-layer: the error is tr(F W G W').
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunekit.compress.stats import SublayerStats
from prunekit.width.importance import SCORERS, unit_scores

# Ridge of the refits and curves, relative to the mean diagonal of the Gram: enough to keep the factorisation
# stable with near-dead channels, small next to any real channel's energy.
RIDGE = 1e-3


@dataclass
class Curve:
    """Keep options of one sub-layer: `ks[j]` units kept (descending, ks[0] = all alive) with Fisher-weighted
    error `err[j]`; `order` lists the alive unit ids strongest first."""

    order: list[int]
    ks: list[int]
    err: list[float]

    def error_at(self, k: int) -> float:
        """The error of keeping `k` units (one of `ks`)."""
        return self.err[self.ks.index(k)]


def unit_columns(units: list[int], cols_per_unit: int) -> torch.Tensor:
    """Input columns of the output projection that `units` own, in that order (units are contiguous column
    blocks: one channel, or the g * head_dim columns of a KV group's query heads)."""
    idx = torch.tensor(units, dtype=torch.long)
    return (idx.unsqueeze(1) * cols_per_unit + torch.arange(cols_per_unit)).reshape(-1)


def unit_strength(gram: torch.Tensor, units: list[int], cols_per_unit: int) -> torch.Tensor:
    """TransAct's score (`width.importance`'s activation scorer): the L2 norm over tokens of each unit's
    activation, from the Gram's diagonal (the per-column sums of squares)."""
    return unit_scores(SCORERS["activation"], torch.diagonal(gram),
                       None, unit_columns(units, cols_per_unit).view(len(units), cols_per_unit))


def _ridge(st: SublayerStats, alive_cols: torch.Tensor, ridge: float) -> float:
    """The ridge in Gram units: relative to the mean energy of the alive columns (the same for every k)."""
    return ridge * float(torch.diagonal(st.gram)[alive_cols].mean().clamp_min(1e-30))


def _on_stats(st: SublayerStats, weight: torch.Tensor) -> torch.Tensor:
    """The weight in float64 where the statistics are (the CPU): the weights may live on a GPU."""
    assert st.gram is not None
    return weight.detach().to(st.gram.device, torch.float64)


def _ordered_gram(st: SublayerStats, cols: torch.Tensor, lam: float) -> torch.Tensor:
    return st.gram[cols][:, cols] + lam * torch.eye(len(cols), dtype=st.gram.dtype)


MAX_STEPS = 96  # greedy removal steps of `obs_order` for single-column units at most


def obs_order(st: SublayerStats, weight: torch.Tensor, alive: list[int], cols_per_unit: int, chunk: int = 16,
              ridge: float = RIDGE) -> list[int]:
    """The alive units strongest first by greedy Optimal Brain Surgeon removal (ZipLM / SlimGPT style),
    Fisher-weighted: repeatedly remove the units whose loss, with the rest refitted, rises least.

    With F = Lf Lf' and V = Lf' W, removing column set S (the others refitted) costs
    tr(V_S (H_SS)^-1 V_S') where H is the inverse of the ridged Gram, and leaves V - V_S (H_SS)^-1 H_S. and
    H - H_.S (H_SS)^-1 H_S. for the rest. Unlike the activation norm, this sees the weights and how the
    columns overlap. Single-column units (an MLP's channels) go `chunk` at a time, or in at most `MAX_STEPS`
    steps for wide layers (each step rewrites H, so a 9k-wide MLP would otherwise take minutes); wider units
    (KV groups) go one at a time."""
    cols = unit_columns(alive, cols_per_unit)
    h = torch.cholesky_inverse(torch.linalg.cholesky(_ordered_gram(st, cols, _ridge(st, cols, ridge))))
    e, u = torch.linalg.eigh(st.fisher)
    v = (u * e.clamp_min(0).sqrt()).T @ _on_stats(st, weight)[:, cols]  # [d, n cols]
    rest = list(alive)  # the units still in, in the order of h's and v's column blocks
    removed: list[int] = []
    step = max(chunk, math.ceil(len(alive) / MAX_STEPS)) if cols_per_unit == 1 else 1
    while rest:
        costs = _removal_costs(v, h, cols_per_unit)
        pos = torch.argsort(costs, stable=True)[:step].tolist()
        going = set(pos)
        kept = [p for p in range(len(rest)) if p not in going]
        gone, stay = unit_columns(pos, cols_per_unit), unit_columns(kept, cols_per_unit)
        shift = h[stay][:, gone] @ torch.linalg.inv(h[gone][:, gone])  # [stay, gone]
        v = v[:, stay] - v[:, gone] @ shift.T
        h = h[stay][:, stay] - shift @ h[gone][:, stay]
        removed.extend(rest[p] for p in pos)
        rest = [rest[p] for p in kept]
    return removed[::-1]


def _removal_costs(v: torch.Tensor, h: torch.Tensor, c: int) -> torch.Tensor:
    """tr(V_S (H_SS)^-1 V_S') for every unit S (columns j*c .. j*c + c - 1)."""
    if c == 1:
        return (v ** 2).sum(0) / torch.diagonal(h)
    n = h.shape[0] // c
    blocks = torch.stack([h[j * c:(j + 1) * c, j * c:(j + 1) * c] for j in range(n)])  # [n, c, c]
    vs = v.T.reshape(n, c, -1)  # [n, c, d]
    return (vs * torch.linalg.solve(blocks, vs)).sum((1, 2))


def keep_options(n: int, step: int) -> list[int]:
    """Kept counts allowed for a sub-layer with n alive units: every multiple of `step` below n, n itself and
    0 (removal), descending."""
    return sorted({n, 0, *range(step, n, step)}, reverse=True)


def error_curve(st: SublayerStats, weight: torch.Tensor, alive: list[int], cols_per_unit: int, step: int,
                ridge: float = RIDGE, order_by: str = "norm") -> Curve:
    """The sub-layer's `Curve`; `weight` is the output projection's current [d, in] weight; units ordered by
    TransAct's activation norm (`order_by="norm"`) or by greedy OBS removal (`"obs"`, `obs_order`)."""
    if order_by == "obs":
        order = obs_order(st, weight, alive, cols_per_unit, ridge=ridge)
    else:
        strength = unit_strength(st.gram, alive, cols_per_unit)
        order = [alive[j] for j in torch.argsort(strength, descending=True, stable=True).tolist()]
    cols = unit_columns(order, cols_per_unit)
    chol = torch.linalg.cholesky(_ordered_gram(st, cols, _ridge(st, cols, ridge)))
    m = chol.T @ _on_stats(st, weight)[:, cols].T  # [in, d]
    row_err = ((m @ st.fisher) * m).sum(1)
    suffix = torch.flip(torch.cumsum(torch.flip(row_err, [0]), 0), [0]).tolist() + [0.0]
    ks = keep_options(len(order), step)
    return Curve(order, ks, [suffix[k * cols_per_unit] for k in ks])


def refit(st: SublayerStats, weight: torch.Tensor, alive: list[int], kept: list[int], cols_per_unit: int,
          ridge: float = RIDGE) -> torch.Tensor:
    """A new full-size [d, in] weight that uses only `kept`'s columns (the rest zero), least-squares fitted to
    the output the current weight gives with all `alive` units (ridge towards the current weights)."""
    all_cols = unit_columns(alive, cols_per_unit)
    keep_cols = unit_columns(kept, cols_per_unit)
    w = _on_stats(st, weight)
    lam = _ridge(st, all_cols, ridge)
    g = _ordered_gram(st, keep_cols, lam)
    rhs = st.gram[keep_cols][:, all_cols] @ w[:, all_cols].T + lam * w[:, keep_cols].T  # [c, d]
    new = torch.zeros_like(w)
    new[:, keep_cols] = torch.linalg.solve(g, rhs).T
    return new.to(weight.dtype)
