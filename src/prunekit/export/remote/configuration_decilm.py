"""Config class for a prunekit export in the Nemotron-NAS layout (model_type `nemotron-nas`).

Copied into the export and named by `auto_map["AutoConfig"]`, so that `AutoConfig.from_pretrained(path,
trust_remote_code=True)` (and vLLM, whose `DeciLMForCausalLM` is built in) can read it: transformers has no
class for this model_type. Imports only transformers. `block_configs` become objects with attribute access
(`block.attention.no_op`, `block.ffn.intermediate_size`), holding exactly the keys written, so a reader that
checks `hasattr(block.ffn, "ffn_mult")` sees it only where the exporter wrote it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from transformers import PretrainedConfig


def _to_obj(value: Any) -> Any:
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _to_obj(v) for k, v in value.items()})
    return value


def _to_dict(value: Any) -> Any:
    if isinstance(value, SimpleNamespace):
        return {k: _to_dict(v) for k, v in vars(value).items()}
    return value


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs: list[Any] | None = None, **kwargs: Any):
        self.block_configs = [_to_obj(b) for b in (block_configs or [])]
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [_to_dict(b) for b in self.block_configs]
        return out
