"""Width importances: pure functions over activations (no hooks, no modules).

Everything width pruning ranks is a group of *input columns* of a projection that writes back into the
residual stream:

* an MLP channel c is column c of `down_proj` (its input is the intermediate activation act(gate) * up);
* a query head h is the `head_dim` columns h*head_dim .. (h+1)*head_dim - 1 of `o_proj` (its input is the
  attention output, laid out [heads, head_dim] per token);
* a KV group k is the columns of its g = num_heads // num_kv_heads query heads k*g .. k*g + g - 1, which are
  contiguous in `o_proj`'s input (query head h reads KV head h // g).

So one statistic serves every scorer and every unit: the per-column sum over (non-padding) calibration tokens
of x_c^2, kept as a float64 running sum (`SquaredSums`). A scorer turns those sums (and, for weight-aware
scorers, the projection's weight) into one additive *term* per column; a unit's score is `finish` applied
to the sum of its columns' terms. Units are given as index tensors [units, columns_per_unit], so channels,
heads, KV groups and "one head from every group" slices all go through `unit_scores`.

Scorers (registry `SCORERS`):

* ``activation`` (TransAct): the L2 norm over tokens of the unit's activation, sqrt(sum_t sum_{c in unit}
  x_tc^2). Term = column sum of squares, finish = sqrt.
* ``weight-activation`` (Wanda-sp / FLAP style): sum over the unit's columns c and output rows j of
  |W[j, c]| * ||x_c||, where ||x_c|| is the L2 norm of column c over tokens. Term = (sum_j |W[j, c]|) * ||x_c||,
  finish = identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class SquaredSums:
    """Float64 running sums over tokens of x_c^2 for every column c of an activation, skipping padding.

    Only the sums live past a batch, so memory is one vector per hooked projection whatever the amount of
    calibration data."""

    def __init__(self, columns: int, device: torch.device | str | None = None):
        self.sums = torch.zeros(columns, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one batch: `x` is [..., columns], `mask` (same leading shape, 1 = real token) or None."""
        rows = masked_rows(x, mask)
        self.sums += (rows * rows).sum(0).to(self.sums.device)
        self.tokens += int(rows.shape[0])


def masked_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`x` flattened to [tokens, columns] in float64, without the tokens where `mask` is 0."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    if mask is None:
        return flat
    keep = mask.reshape(-1).to(device=flat.device) != 0
    if keep.numel() != flat.shape[0]:
        raise ValueError(f"mask has {keep.numel()} tokens but the activation has {flat.shape[0]}")
    return flat[keep]


@dataclass(frozen=True)
class Scorer:
    """How a unit's importance is computed from its columns.

    `terms(sq_sums, weight)` gives one additive float64 term per input column (weight: the projection's
    [out, in] weight or its `weight_columns` [in], or None for scorers that do not use it); a unit's score is `finish(sum of its terms)`.
    `finish` must be monotone non-decreasing, so ranking by summed terms equals ranking by score."""

    name: str
    terms: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    finish: Callable[[torch.Tensor], torch.Tensor]
    uses_weight: bool
    description: str


def _activation_terms(sq_sums: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return sq_sums.to(torch.float64)


def weight_columns(weight: torch.Tensor) -> torch.Tensor:
    """[in] float64 L1 norm of every input column of a projection weight [out, in]: all the weight-activation
    scorer needs of the weight. A streamed run keeps this vector per layer instead of the weight itself."""
    return weight.detach().abs().to(torch.float64).sum(0)


def _weight_activation_terms(sq_sums: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        raise ValueError("the weight-activation scorer needs the projection weight")
    # Either the weight [out, in] or its precomputed `weight_columns` [in] (same numbers either way).
    col_abs = weight_columns(weight) if weight.dim() == 2 else weight.to(torch.float64)
    if col_abs.shape[0] != sq_sums.shape[0]:
        raise ValueError(f"weight has {col_abs.shape[0]} input columns but the statistics have {sq_sums.shape[0]}")
    return col_abs.to(sq_sums.device) * torch.sqrt(sq_sums.to(torch.float64))


SCORERS: dict[str, Scorer] = {
    "activation": Scorer(
        name="activation",
        terms=_activation_terms,
        finish=torch.sqrt,
        uses_weight=False,
        description="L2 norm over calibration tokens of the unit's activation (TransAct)",
    ),
    "weight-activation": Scorer(
        name="weight-activation",
        terms=_weight_activation_terms,
        finish=lambda t: t,
        uses_weight=True,
        description="sum of |W| * ||x|| over the unit's columns of the output projection (Wanda-sp/FLAP)",
    ),
}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        # ValueError, not PlanError: callers validate user input against `SCORERS` before getting here.
        raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")
    return SCORERS[name]


# --- units ----------------------------------------------------------------------------------------------------
def channel_units(num_channels: int) -> torch.Tensor:
    """[C, 1]: every channel is its own unit."""
    return torch.arange(num_channels).unsqueeze(1)


def head_units(num_heads: int, head_dim: int) -> torch.Tensor:
    """[H, head_dim]: the o_proj input columns of every query head."""
    return torch.arange(num_heads * head_dim).view(num_heads, head_dim)


def kv_group_units(num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[KV, g * head_dim]: the o_proj input columns of the g query heads that share each KV head."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot be split into {num_kv_heads} KV groups")
    return torch.arange(num_heads * head_dim).view(num_kv_heads, (num_heads // num_kv_heads) * head_dim)


def unit_terms(scorer: Scorer, sq_sums: torch.Tensor, weight: torch.Tensor | None,
               units: torch.Tensor) -> torch.Tensor:
    """Summed (un-finished) terms of every unit: [U] float64. Additive, so units can be merged later."""
    terms = scorer.terms(sq_sums, weight)
    return terms[units.to(terms.device)].sum(-1)


def unit_scores(scorer: Scorer, sq_sums: torch.Tensor, weight: torch.Tensor | None,
                units: torch.Tensor) -> torch.Tensor:
    """Score of every unit ([U, columns] index tensor into the projection's input columns): [U] float64."""
    return scorer.finish(unit_terms(scorer, sq_sums, weight, units))


def channel_scores(scorer: str | Scorer, sq_sums: torch.Tensor, down_weight: torch.Tensor | None) -> torch.Tensor:
    """[C] MLP channel scores from the `down_proj` input statistics (and its weight)."""
    s = get_scorer(scorer) if isinstance(scorer, str) else scorer
    return unit_scores(s, sq_sums, down_weight, channel_units(sq_sums.shape[0]))


def head_scores(scorer: str | Scorer, sq_sums: torch.Tensor, o_weight: torch.Tensor | None,
                num_heads: int) -> torch.Tensor:
    """[H] query-head scores from the `o_proj` input statistics (and its weight)."""
    s = get_scorer(scorer) if isinstance(scorer, str) else scorer
    if sq_sums.shape[0] % num_heads:
        raise ValueError(f"{sq_sums.shape[0]} columns do not split into {num_heads} heads")
    return unit_scores(s, sq_sums, o_weight, head_units(num_heads, sq_sums.shape[0] // num_heads))


def kv_group_scores(scorer: str | Scorer, sq_sums: torch.Tensor, o_weight: torch.Tensor | None,
                    num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """[KV] KV-group scores: the scorer applied to all columns of the query heads sharing each KV head
    (for ``activation`` the L2 norm of the group's whole output; for ``weight-activation`` the sum of its
    heads' scores)."""
    s = get_scorer(scorer) if isinstance(scorer, str) else scorer
    if sq_sums.shape[0] % num_heads:
        raise ValueError(f"{sq_sums.shape[0]} columns do not split into {num_heads} heads")
    return unit_scores(s, sq_sums, o_weight, kv_group_units(num_heads, num_kv_heads, sq_sums.shape[0] // num_heads))


def removal_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorted least important first; ties go to the lower index (stable sort), so plans are
    deterministic."""
    return torch.sort(scores.detach().to(torch.float64).cpu(), stable=True).indices
