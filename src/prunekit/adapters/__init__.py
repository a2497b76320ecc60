"""Architecture adapters: the only code in prunekit that knows module paths.

An adapter is chosen by `config.model_type` from a plain table (`ADAPTERS`). Algorithms ask the adapter for
"the layers", "the attention of layer i", "the module whose input is the residual stream after attention",
and never spell `model.model.layers[i].self_attn` themselves. Dense families get a `ModelAdapter`, the
Mixture-of-Experts rows (`ArchSpec.moe`) its subclass `MoEAdapter`.
"""

from torch import nn

from prunekit.adapters.base import ADAPTERS, ArchSpec, ModelAdapter, supported_model_types
from prunekit.adapters.moe import MoEAdapter
from prunekit.errors import UnsupportedArchitectureError

__all__ = ["ArchSpec", "ModelAdapter", "MoEAdapter", "get_adapter", "supported_model_types", "ADAPTERS"]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Adapter for `model`, chosen by `model.config.model_type`; unknown types fail loudly."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ADAPTERS.get(model_type)  # type: ignore[arg-type]
    if spec is None:
        raise UnsupportedArchitectureError(
            f"prunekit has no adapter for model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return MoEAdapter(model, spec) if spec.moe is not None else ModelAdapter(model, spec)
