"""Expert ranking (pure functions of `ExpertStats`) and the plans that drop experts or narrow them.

Scores, higher = keep:
- `router`: how often the router picks an expert times the mean weight it then gets, which is the expert's
  router weight summed over its tokens divided by all tokens (the "frequency x strength" of the MoE
  compression study, arXiv 2406.02500);
- `reap`: REAP's saliency (arXiv 2510.13999), the mean over the tokens routed to an expert of router weight
  x the norm of the expert's output; an expert no token picks scores 0.
Each expert's channels are ranked by the gate-weighted activation energy of the tokens routed to it; every
expert of a layer keeps the same number (the fused tensors need one width), each its own.
"""

from __future__ import annotations

import torch

from prunekit.adapters.moe import MoEAdapter
from prunekit.errors import PlanError, UnsupportedArchitectureError
from prunekit.moe.stats import ExpertStats
from prunekit.plans import LayerWidth, PruningPlan

EXPERT_SCORES: tuple[str, ...] = ("router", "reap")


def is_moe_model(adapter: object) -> bool:
    """Whether the adapter's model has at least one sparse expert block."""
    return isinstance(adapter, MoEAdapter) and bool(adapter.moe_layers())


def check_moe(adapter: object, what: str) -> MoEAdapter:
    """The adapter as a `MoEAdapter` with at least one MoE layer, or one clear error."""
    if not is_moe_model(adapter):
        family = getattr(getattr(adapter, "spec", None), "family", "this model")
        raise UnsupportedArchitectureError(f"{what} needs a Mixture-of-Experts model; {family} has no expert layers")
    return adapter  # type: ignore[return-value]


def check_expert_drop(adapter: object, n: int, score: str) -> MoEAdapter:
    """Validate `--target expert --n N --expert-score S` before any work."""
    if score not in EXPERT_SCORES:
        raise PlanError(f"unknown expert score {score!r}; choose one of {', '.join(EXPERT_SCORES)}")
    ad = check_moe(adapter, "--target expert")
    fewest = min(ad.num_experts(ad.layers()[i]) for i in ad.moe_layers())
    if not 1 <= n < fewest:
        raise PlanError(f"--n {n} experts per layer: must be at least 1 and below the {fewest} experts of the "
                        f"smallest MoE layer (at least one must remain)")
    return ad


def expert_scores(stats: ExpertStats, score: str) -> dict[int, torch.Tensor]:
    """One score per expert of every MoE layer (higher = more important)."""
    out: dict[int, torch.Tensor] = {}
    for i, st in stats.items():
        if score == "router":
            out[i] = st.gates / max(st.tokens, 1.0)
        else:
            out[i] = torch.where(st.picks > 0, st.reap / st.picks.clamp(min=1.0), torch.zeros_like(st.reap))
    return out


def least_important(scores: torch.Tensor, n: int) -> list[int]:
    """The `n` lowest-scoring indices; ties go to the higher index (stable, so plans are reproducible)."""
    order = sorted(range(scores.numel()), key=lambda e: (float(scores[e]), -e))
    return sorted(order[:n])


def choose_expert_drops(adapter: MoEAdapter, stats: ExpertStats, n: int, score: str = "router") -> PruningPlan:
    """A plan keeping all but the `n` least important experts of every MoE layer."""
    scores = expert_scores(stats, score)
    widths = {}
    for i, s in scores.items():
        gone = set(least_important(s, n))
        widths[i] = LayerWidth(experts=[e for e in range(s.numel()) if e not in gone])
    return PruningPlan(widths=widths, method="expert-drop", options={"n": n, "expert_score": score},
                       scores={"experts": {str(i): [float(v) for v in s] for i, s in scores.items()}},
                       model={"num_hidden_layers": adapter.num_layers})


def top_channels(scores: torch.Tensor, k: int) -> list[int]:
    """The `k` highest-scoring indices, ascending; ties go to the lower index."""
    order = sorted(range(scores.numel()), key=lambda c: (-float(scores[c]), c))
    return sorted(order[:k])


def choose_expert_widths(stats: ExpertStats, counts: dict[int, tuple[int, int | None]]) -> dict[int, LayerWidth]:
    """Kept channels of every MoE layer: each expert its own top counts[i][0] by the gate-weighted activation
    energy of the tokens routed to it, and the shared expert its top counts[i][1]; indices of the layers as
    they are now."""
    out: dict[int, LayerWidth] = {}
    for i, st in stats.items():
        k, k_shared = counts[i]
        w = LayerWidth(expert_channels=[top_channels(row, k) for row in st.channels])
        if st.shared is not None and k_shared is not None:
            w.shared_channels = top_channels(st.shared, k_shared)
        out[i] = w
    return out
