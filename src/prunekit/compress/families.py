"""The registry of `compress`'s candidate families: how each spends the budget on the error curves, and which
steps of the search try it. Adding a family is one entry of `CANDIDATE_FAMILIES`.

Every family is tried one-shot on the dense model's curves (units ranked by `order`), each cut projection
refitted; ``mixed`` also without the refit, the check that refitting helps (a refit on too few tokens
overfits). With `--probe-samples` the `measured` families are tried again on curves rescaled by measurement
(`compress.measure`), and with `--rounds` above 1 the `in_rounds` family is reached in rounds, both in the unit
order whose one-shot candidate of the `in_rounds` family checked better (`better_order`). The `mlp_width`
families spend the budget on MLP channels alone; a model whose MLPs include blocks of experts (kept or removed
whole) skips them (`applicable`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from prunekit.compress.allocate import allocate, near_uniform_mlp, uniform_mlp
from prunekit.compress.budget import SublayerCost
from prunekit.compress.curves import Curve
from prunekit.compress.stats import Sublayer

OBS_TAG = " (OBS order)"  # candidate names of units ranked by `curves.obs_order`
MEASURED_TAG = " (measured)"  # candidate names allocated on curves rescaled by probes (`compress.measure`)

# Kept count per cut sub-layer, from (curves, costs, need, key): remove at least `need` of `key` ("params" or
# "kv"), or as close as the family allows; {} where the family cannot (the candidate is skipped).
Allocation = Callable[[dict[Sublayer, Curve], dict[Sublayer, SublayerCost], int, str], dict[Sublayer, int]]


@dataclass(frozen=True)
class Family:
    """One candidate family. `order`: the unit order of the one-shot curves ("norm": activation norm, "obs":
    greedy Optimal Brain Surgeon removal). `without_refit`: also tried with the cut units only zeroed.
    `measured`: tried again on measured curves. `in_rounds`: reached in rounds, the statistics re-taken on the
    partly pruned model in between (one family at most: every round takes a set of statistics). `mlp_width`:
    it gives every MLP one width, which a block of experts does not have here (`applicable`)."""

    name: str
    allocate: Allocation
    order: str = "norm"
    without_refit: bool = False
    measured: bool = False
    in_rounds: bool = False
    mlp_width: bool = False

    @property
    def one_shot_name(self) -> str:
        return self.name + order_tag(self.order)


CANDIDATE_FAMILIES: tuple[Family, ...] = (
    # Widths and drops chosen together.
    Family("mixed", partial(allocate, family="mixed"), without_refit=True, measured=True, in_rounds=True),
    Family("mixed", partial(allocate, family="mixed"), order="obs"),
    Family("depth", partial(allocate, family="depth")),  # sub-layer drops only
    Family("width", partial(allocate, family="width"), measured=True),  # per-layer widths only
    Family("uniform-width", uniform_mlp, mlp_width=True),  # TransAct's uniform MLP width
    # The same, with some MLPs one step wider so as not to overshoot the budget.
    Family("near-uniform-width", near_uniform_mlp, measured=True, mlp_width=True),
)

# Why the `mlp_width` families are skipped on a model with blocks of experts (the plan's `skipped_families`).
WHOLE_MLP_SKIP = ("it narrows every MLP to one width, and compress keeps or removes a block of experts whole "
                  "(experts and their channels are not units of its budget)")


def applicable(whole_mlp: bool) -> tuple[tuple[Family, ...], dict[str, str]]:
    """The families tried on a model, and why any is skipped (by name); `whole_mlp`: some MLP of the model is
    kept or removed whole (a block of experts)."""
    if not whole_mlp:
        return CANDIDATE_FAMILIES, {}
    skipped = {f.name: WHOLE_MLP_SKIP for f in CANDIDATE_FAMILIES if f.mlp_width}
    return tuple(f for f in CANDIDATE_FAMILIES if not f.mlp_width), skipped


def order_tag(order: str) -> str:
    """What a candidate's name says of its unit order."""
    return OBS_TAG if order == "obs" else ""


def orders() -> tuple[str, ...]:
    """The unit orders the search needs the dense model's curves in: "norm" always (LLM-Drop's candidates
    are zeroed along it), and every one-shot family's."""
    return tuple(dict.fromkeys(("norm", *(f.order for f in CANDIDATE_FAMILIES))))


def rounds_family() -> Family:
    """The family flagged `in_rounds`."""
    (family,) = (f for f in CANDIDATE_FAMILIES if f.in_rounds)
    return family


def better_order(values: dict[str, float]) -> str:
    """The unit order whose one-shot candidate of the rounds family did better on the check part (`values`:
    check value by candidate name): the measured candidates and the rounds use it (taking the statistics again
    for both orders would cost another set of passes per round)."""
    name = rounds_family().name
    obs, norm = values.get(name + OBS_TAG), values.get(name)
    return "obs" if obs is not None and (norm is None or obs < norm) else "norm"
