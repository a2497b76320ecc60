"""What does not take Mixture-of-Experts models yet, and why: one clear error each, raised before any work."""

from __future__ import annotations

from prunekit.adapters import ADAPTERS
from prunekit.errors import UnsupportedArchitectureError

WHY_NOT: dict[str, str] = {
    "compress": "its budget search weighs dense MLP channels and KV groups, not experts; use drop --target "
                "expert and width --mlp-keep",
    "linear repair": "it folds a map into the MLP's output projection, and an MoE block has one per expert",
}


def moe_family(model_type: str | None) -> str | None:
    """The family name where `model_type` is a Mixture-of-Experts row of the adapter table, else None."""
    spec = ADAPTERS.get(model_type or "")
    return spec.family if spec is not None and spec.moe is not None else None


def refuse_moe(model_type: str | None, what: str) -> None:
    """`UnsupportedArchitectureError` when `what` (a key of `WHY_NOT`) meets a Mixture-of-Experts family."""
    family = moe_family(model_type)
    if family is not None:
        raise UnsupportedArchitectureError(f"{what} does not support Mixture-of-Experts models ({family}) yet: "
                                           f"{WHY_NOT[what]}")
