"""What does not take Mixture-of-Experts models yet, and why: one clear error each, raised before any work."""

from __future__ import annotations

import json
from pathlib import Path

from prunekit.adapters import ADAPTERS
from prunekit.errors import UnsupportedArchitectureError

WHY_NOT: dict[str, str] = {
    "layer streaming": "transformers saves MoE checkpoints with one tensor per expert, which the streamed "
                       "reader does not fuse into the model's expert tensors; load it in memory",
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


def checkpoint_model_type(folder: str | Path) -> str | None:
    """config.json's model_type in a checkpoint folder (None where it cannot be read)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg.get("model_type") if isinstance(cfg, dict) else None
