"""LoRA through peft for recovery, merged back before saving.

The target modules come from the model's adapter (`ArchSpec` names of the q/k/v/o and gate/up/down
projections), as full module paths and only on layers that still have the sub-layer: a removed attention or
MLP has no projections, and a narrowed one gets a LoRA of its own (narrower) shape. `merge` folds the
low-rank updates into the weights (`merge_and_unload`), so the healed checkpoint is a plain prunekit
checkpoint: same config, same tensor names and shapes, same parameter count as before.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from prunekit.adapters import get_adapter
from prunekit.errors import RecoveryError
from prunekit.moe.surgery import is_moe_layer


def check_rank(rank: int | None) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise RecoveryError(f"the LoRA rank must be a positive integer, got {rank!r}")


def lora_targets(model: nn.Module) -> list[str]:
    """Full paths of the projection modules that LoRA adapts, read from the adapter."""
    ad = get_adapter(model)
    s = ad.spec
    out: list[str] = []
    for i, layer in enumerate(ad.layers()):
        prefix = ad.layer_prefix(i)
        if ad.has_attention(layer):
            out += [prefix + name for name in ad.projection_names("attn")]
        if is_moe_layer(ad, layer):  # LoRA cannot wrap the fused expert tensors; a shared expert is plain Linear
            shared = s.moe.shared_expert if s.moe else None
            out += [f"{prefix}{s.mlp}.{shared}.{name}" for name in (s.gate_proj, s.up_proj, s.down_proj)
                    if shared and name]
        elif ad.has_mlp(layer):
            out += [prefix + name for name in ad.projection_names("mlp")]
    if not out:
        raise RecoveryError("the model has no attention or MLP projections left for LoRA to adapt")
    return out


def add_lora(model: nn.Module, rank: int, *, alpha: float | None = None, dropout: float = 0.0) -> Any:
    """Wrap `model` in a peft LoRA model (rank `rank`, scaling alpha/rank with alpha = 2 * rank unless
    given); only the LoRA matrices are trainable. B starts at zero, so the wrapped model computes exactly
    what `model` did."""
    check_rank(rank)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # an optional extra: say how to get it
        raise RecoveryError("--lora needs peft: pip install 'prunekit[heal]'") from e
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                     target_modules=lora_targets(model), bias="none")
    return get_peft_model(model, cfg)


def merge_lora(peft_model: Any) -> nn.Module:
    """Fold the LoRA updates into the base weights and return the plain model (no peft modules left)."""
    model = peft_model.merge_and_unload()
    # get_peft_model leaves its config attached; a plain prunekit model must not carry it into the save.
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    return model
