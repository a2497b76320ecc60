"""Architecture adapters: the only code in prunekit that knows module paths.

An adapter is chosen by `config.model_type` from a plain table (`ADAPTERS`). Algorithms ask the adapter for
"the layers", "the attention of layer i", "the module whose input is the residual stream after attention",
and never spell `model.model.layers[i].self_attn` themselves.
"""

from prunekit.adapters.base import ADAPTERS, ArchSpec, ModelAdapter, get_adapter, supported_model_types

__all__ = ["ArchSpec", "ModelAdapter", "get_adapter", "supported_model_types", "ADAPTERS"]
