"""Adapter table and the `ModelAdapter` that resolves module paths for one loaded model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.adapters.moe_layouts import GPT_OSS, MIXTRAL, OLMOE, QWEN2_MOE, QWEN3_MOE, MoESpec
from prunekit.adapters.units import UnitBlock, UnitKind, Widths
from prunekit.errors import UnsupportedArchitectureError
from prunekit.hf_remote.modeling_prunekit import DroppedAttention, DroppedMLP, drop_attention, drop_mlp
from prunekit.plans import LayerWidth


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one architecture family. Plain data: a new family is a new row."""

    family: str
    layers: str = "model.layers"  # dotted path from the *ForCausalLM object to the decoder ModuleList
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    # Norms that only serve the attention (or MLP) sub-layer: they go away with it.
    attn_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    # The module whose *input* is the residual stream between the attention and the MLP sub-layers.
    # Hooking it gives the "after attention" state without re-implementing the decoder layer.
    mid_residual: str = "post_attention_layernorm"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    gate_proj: str | None = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    # Fused projections (Phi-3): one module holding q, k and v rows (in that order), or gate and up rows. When
    # set, they replace q_proj/k_proj/v_proj (gate_proj/up_proj); `units` says which rows each unit owns.
    qkv_proj: str | None = None
    gate_up_proj: str | None = None
    # Norms applied to q and k: per head (Qwen3, Gemma3: [head_dim], shared by all heads) unless
    # `qk_norm_full_width` (OLMo 2: one gain per projection row, so narrowing heads slices them too).
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm_full_width: bool = False
    # Sub-config holding the text decoder's settings (multimodal wrappers), or None for the config itself.
    text_config: str | None = None
    # Whether a norm follows each sub-layer's output projection before the residual add (Gemma 3): then a
    # linear map cannot be folded into that projection (`repair`).
    output_norms: bool = False
    # Mixture-of-Experts families: where the experts, the router and a shared expert live (`adapters.moe`).
    moe: MoESpec | None = None
    # Whether the attention module reads its head counts from its `config` at call time (Phi-3 splits the
    # fused qkv output by `config.num_attention_heads`): a narrowed attention then gets its own config copy.
    attn_reads_config: bool = False


_LLAMA = ArchSpec(family="llama")
_QWEN3 = ArchSpec(family="qwen3", q_norm="q_norm", k_norm="k_norm")
_GEMMA3_TEXT = ArchSpec(
    family="gemma3",
    output_norms=True,
    attn_norms=("input_layernorm", "post_attention_layernorm"),
    mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    mid_residual="pre_feedforward_layernorm",
    q_norm="q_norm",
    k_norm="k_norm",
)
_GEMMA3_MM = ArchSpec(
    family="gemma3",
    layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    attn_norms=_GEMMA3_TEXT.attn_norms,
    mlp_norms=_GEMMA3_TEXT.mlp_norms,
    mid_residual=_GEMMA3_TEXT.mid_residual,
    output_norms=True,
    q_norm="q_norm",
    k_norm="k_norm",
    text_config="text_config",
)

# Gemma 2: Gemma 3's pre/post norms and soft-capping without q/k norms.
_GEMMA2 = ArchSpec(
    family="gemma2",
    output_norms=True,
    attn_norms=_GEMMA3_TEXT.attn_norms,
    mlp_norms=_GEMMA3_TEXT.mlp_norms,
    mid_residual=_GEMMA3_TEXT.mid_residual,
)
# OLMo 2: no pre-norms; each sub-layer's output is normed before the residual add, so the MLP itself is the
# first module that reads the residual stream between the sub-layers.
_OLMO2 = ArchSpec(
    family="olmo2",
    output_norms=True,
    attn_norms=("post_attention_layernorm",),
    mlp_norms=("post_feedforward_layernorm",),
    mid_residual="mlp",
    q_norm="q_norm",
    k_norm="k_norm",
    qk_norm_full_width=True,
)
_PHI3 = ArchSpec(family="phi3", qkv_proj="qkv_proj", gate_up_proj="gate_up_proj", attn_reads_config=True)

# Keyed by `config.model_type`. Mistral, Qwen2, Granite and SmolLM3 share Llama's module names (Qwen2 adds
# q/k/v biases, which the width surgery handles generically; Granite's multipliers are scalars that layer
# drops and width cuts leave exact, its logit divisor is in `ModelAdapter.logits`; SmolLM3's per-layer
# `no_rope_layers` is sliced with the layers by `config_edit.keep_layers`).
ADAPTERS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": ArchSpec(family="mistral"),
    "qwen2": ArchSpec(family="qwen2"),
    "qwen3": _QWEN3,
    "gemma3_text": _GEMMA3_TEXT,
    "gemma3": _GEMMA3_MM,
    "gemma2": _GEMMA2,
    "olmo2": _OLMO2,
    "granite": ArchSpec(family="granite"),
    "smollm3": ArchSpec(family="smollm3"),
    "phi3": _PHI3,
    "mixtral": ArchSpec(family="mixtral", moe=MIXTRAL),
    "qwen2_moe": ArchSpec(family="qwen2_moe", moe=QWEN2_MOE),
    "qwen3_moe": ArchSpec(family="qwen3_moe", q_norm="q_norm", k_norm="k_norm", moe=QWEN3_MOE),
    # OLMoE's q/k norms span the whole projection, not one head (hence `OLMOE.fixed_heads`).
    "olmoe": ArchSpec(family="olmoe", q_norm="q_norm", k_norm="k_norm", moe=OLMOE),
    "gpt_oss": ArchSpec(family="gpt_oss", moe=GPT_OSS),
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, dotted: str, value: Any) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(_get(obj, parent) if parent else obj, name, value)


class ModelAdapter:
    """Resolves module paths and architecture facts for one model, following its `ArchSpec`."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self.model = model
        self.spec = spec

    # --- config -------------------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The text decoder's config (the model config itself for plain causal LMs)."""
        cfg = self.model.config
        return getattr(cfg, self.spec.text_config) if self.spec.text_config else cfg

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def head_dim(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else self.hidden_size // int(self.config.num_attention_heads)

    # --- modules ------------------------------------------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        return _get(self.model, self.spec.layers)

    def set_layers(self, layers: nn.ModuleList) -> None:
        _set(self.model, self.spec.layers, layers)

    def base_model(self) -> nn.Module:
        """The decoder stack without the LM head (scoring never needs the logits)."""
        return _get(self.model, self.base_path)

    def embed(self) -> nn.Module:
        return _get(self.model, self.spec.embed)

    def set_embed(self, module: nn.Module) -> None:
        _set(self.model, self.spec.embed, module)

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    def set_final_norm(self, module: nn.Module) -> None:
        _set(self.model, self.spec.final_norm, module)

    def lm_head(self) -> nn.Module:
        return _get(self.model, self.spec.lm_head)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's next-token logits from the last decoder layer's output `h`, as its own forward computes
        them: final norm, LM head, Granite's `logits_scaling` divisor, and the tanh soft-capping some families
        apply (Gemma 2/3's `final_logit_softcapping`)."""
        out = self.lm_head()(self.final_norm()(h))
        scaling = getattr(self.config, "logits_scaling", None)
        if scaling is not None and scaling != 1:
            out = out / scaling
        cap = getattr(self.config, "final_logit_softcapping", None)
        return out if not cap else torch.tanh(out / cap) * cap

    def attn(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.spec.attn)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.spec.mlp)

    def mid_residual_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.spec.mid_residual)

    def attn_projections(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """(q, k, v, o) of a family with separate projections; a fused family has no such four (use
        `attn_modules` / `unit_blocks`)."""
        s = self.spec
        if s.qkv_proj:
            raise UnsupportedArchitectureError(f"{s.family} fuses q, k and v into one {s.qkv_proj}: this step "
                                               "needs separate projections")
        a = self.attn(layer)
        return getattr(a, s.q_proj), getattr(a, s.k_proj), getattr(a, s.v_proj), getattr(a, s.o_proj)

    def split_weights(self, layer: nn.Module, part: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of each input projection as if unfused: q, k, v for `attn`, gate, up for `mlp` (rows
        of a fused projection, in the order the family stores them), for writers of unfused formats."""
        s = self.spec
        fused = s.qkv_proj if part == "attn" else s.gate_up_proj
        if not fused:
            if part == "attn":
                return [(p.weight, p.bias) for p in self.attn_projections(layer)[:3]]
            return [(p.weight, p.bias) for p in self.mlp_projections(layer)[:2] if p is not None]
        (proj,) = self.input_projections(layer, part)
        if part == "attn":
            heads, kv = self.attention_shape(layer)
            sizes = [heads * self.head_dim, kv * self.head_dim, kv * self.head_dim]
        else:
            sizes = [self.mlp_width(layer)] * 2
        weights = proj.weight.split(sizes)
        biases = proj.bias.split(sizes) if proj.bias is not None else [None] * len(sizes)
        return list(zip(weights, biases))

    def qk_norms(self, layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        a = self.attn(layer)
        s = self.spec
        return (getattr(a, s.q_norm) if s.q_norm else None, getattr(a, s.k_norm) if s.k_norm else None)

    def mlp_projections(self, layer: nn.Module) -> tuple[nn.Linear | None, nn.Linear, nn.Linear]:
        """(gate or None, up, down) of a family with separate projections (see `attn_projections`)."""
        s = self.spec
        if s.gate_up_proj:
            raise UnsupportedArchitectureError(f"{s.family} fuses gate and up into one {s.gate_up_proj}: this "
                                               "step needs separate projections")
        m = self.mlp(layer)
        gate = getattr(m, s.gate_proj) if s.gate_proj else None
        return gate, getattr(m, s.up_proj), getattr(m, s.down_proj)

    def input_projections(self, layer: nn.Module, part: str) -> list[nn.Linear]:
        """The projections that read a sub-layer's (normalised) input, all from the same tensor: q/k/v (or the
        fused qkv) for `attn`, gate/up (or the fused gate_up) for `mlp`."""
        s = self.spec
        if part == "attn":
            a = self.attn(layer)
            names = [s.qkv_proj] if s.qkv_proj else [s.q_proj, s.k_proj, s.v_proj]
            return [getattr(a, n) for n in names]
        m = self.mlp(layer)
        names = [s.gate_up_proj] if s.gate_up_proj else [n for n in (s.gate_proj, s.up_proj) if n]
        return [getattr(m, n) for n in names]

    def output_projection(self, layer: nn.Module, part: str) -> nn.Linear:
        """The projection whose output a sub-layer (`attn` or `mlp`) adds to the residual stream."""
        if part == "attn":
            return getattr(self.attn(layer), self.spec.o_proj)
        return getattr(self.mlp(layer), self.spec.down_proj)

    def residual_outputs(self, layer: nn.Module, part: str) -> list[tuple[str, int]]:
        """(tensor name relative to the layer, axis indexing the residual stream) of every tensor whose values
        a sub-layer adds to the residual stream linearly: a linear map of the sub-layer's output folds into
        each of them along that axis (`repair.linear`)."""
        proj = self.output_projection(layer, part)
        name = f"{self.spec.attn}.{self.spec.o_proj}" if part == "attn" else f"{self.spec.mlp}.{self.spec.down_proj}"
        return [(f"{name}.weight", 0), *([(f"{name}.bias", 0)] if proj.bias is not None else [])]

    def has_output_projection(self, layer: nn.Module, part: str) -> bool:
        """Whether a sub-layer's output is one projection's (`output_projection`); a block of experts' is not."""
        return True

    def narrowable(self, layer: nn.Module, part: str) -> bool:
        """Whether a sub-layer's units (KV groups, MLP channels) can be removed one by one; where not, `compress`
        keeps or removes it whole."""
        return True

    def mlp_output(self, out: Any) -> torch.Tensor:
        """What an MLP module's forward adds to the residual stream, from what it returns (`out`, or its first
        element where the block returns a tuple)."""
        return out[0] if isinstance(out, tuple) else out

    def projections(self, layer: nn.Module, part: str) -> list[nn.Linear]:
        """Every projection module of a sub-layer, input ones first, fused or not (what LoRA adapts and what
        parameter and FLOP counts read)."""
        return [*self.input_projections(layer, part), self.output_projection(layer, part)]

    def projection_names(self, part: str) -> list[str]:
        """Paths of `projections` relative to the decoder layer."""
        s = self.spec
        if part == "attn":
            names = [s.qkv_proj] if s.qkv_proj else [s.q_proj, s.k_proj, s.v_proj]
            return [f"{s.attn}.{n}" for n in (*names, s.o_proj)]
        names = [s.gate_up_proj] if s.gate_up_proj else [n for n in (s.gate_proj, s.up_proj) if n]
        return [f"{s.mlp}.{n}" for n in (*names, s.down_proj)]

    # --- prunable units (`adapters.units`) ----------------------------------------------------------------
    def unit_widths(self, layer: nn.Module) -> Widths:
        """A layer's unit counts as its modules are now (zero for a removed sub-layer)."""
        nh, nkv = self.attention_shape(layer) if self.has_attention(layer) else (0, 0)
        return Widths(nh, nkv, self.mlp_width(layer) if self.has_mlp(layer) else 0, self.head_dim)

    def unit_blocks(self, widths: Widths, part: str) -> dict[UnitKind, list[UnitBlock]]:
        """Where each unit kind of sub-layer `part` sits, for a layer with `widths` (see `adapters.units`)."""
        return attention_blocks(self.spec, widths) if part == "attn" else mlp_blocks(self.spec, widths)

    # --- module paths (checkpoint tensor names follow them) ---------------------------------------------------
    @property
    def base_path(self) -> str:
        """Dotted path of the decoder stack (the module holding the layers, the embedding and the final norm)."""
        return self.spec.layers.rpartition(".")[0]

    def layer_prefix(self, i: int) -> str:
        """Prefix of layer `i`'s tensor names, e.g. `model.layers.3.`."""
        return f"{self.spec.layers}.{i}."

    def aux_modules(self) -> list[tuple[str, nn.Module]]:
        """(tensor-name prefix, module) of the decoder stack's children other than the layers, the embedding and
        the final norm (the rotary embedding, typically): small, needed to compute how layers are called."""
        base = self.base_model()
        skip = {id(self.layers()), id(self.embed()), id(self.final_norm())}
        return [(f"{self.base_path}.{name}.", child) for name, child in base.named_children() if id(child) not in skip]

    # --- shapes: read from the modules, so they are right after any surgery ---------------------------------
    def has_attention(self, layer: nn.Module) -> bool:
        return not isinstance(self.attn(layer), DroppedAttention)

    def has_mlp(self, layer: nn.Module) -> bool:
        return not isinstance(self.mlp(layer), DroppedMLP)

    def attention_shape(self, layer: nn.Module) -> tuple[int, int]:
        """(query heads, KV heads) a layer's attention currently has, read from its projections."""
        hd = self.head_dim
        heads = self.output_projection(layer, "attn").in_features // hd
        if self.spec.qkv_proj:
            return heads, (self.input_projections(layer, "attn")[0].out_features - heads * hd) // (2 * hd)
        return heads, self.input_projections(layer, "attn")[1].out_features // hd

    def mlp_width(self, layer: nn.Module) -> int:
        return self.output_projection(layer, "mlp").in_features

    def layer_widths(self, layer: nn.Module) -> dict[str, int]:
        """Widths a layer actually has, by config field name (empty for removed sub-layers)."""
        out: dict[str, int] = {}
        if self.has_attention(layer):
            out["num_attention_heads"], out["num_key_value_heads"] = self.attention_shape(layer)
        if self.has_mlp(layer):
            out["intermediate_size"] = self.mlp_width(layer)
        return out

    def check_narrow_heads(self) -> None:
        """Raise `PlanError` where this family's heads cannot be narrowed (nothing for the dense rows)."""

    def mlp_macs(self, layer: nn.Module) -> int:
        """Multiply-adds one token costs in the layer's MLP (its projections)."""
        return sum(m.in_features * m.out_features for m in self.projections(layer, "mlp"))

    def width_fields(self) -> tuple[str, ...]:
        """The config fields `layer_widths` may name: the ones a uniform structure writes as stock fields."""
        return ("num_attention_heads", "num_key_value_heads", "intermediate_size")

    def planned_widths(self, layer: nn.Module, w: LayerWidth) -> dict[str, int]:
        """The widths (by config field, as `layer_widths` names them) that `w` gives a layer."""
        out: dict[str, int] = {}
        for key, kept in (("num_attention_heads", w.heads), ("num_key_value_heads", w.kv_heads),
                          ("intermediate_size", w.channels)):
            if kept is not None:
                out[key] = len(kept)
        return out

    def output_norm(self, layer: nn.Module, part: str) -> nn.Module | None:
        """The norm a sub-layer's output passes through before the residual add (Gemma 3's post-norms), or None
        where the projection's output is added as it is."""
        if not self.spec.output_norms:
            return None
        return getattr(layer, (self.spec.attn_norms if part == "attn" else self.spec.mlp_norms)[-1])

    # --- module swaps ---------------------------------------------------------------------------------------
    def remove_attention(self, layer: nn.Module, layer_idx: int) -> None:
        """Replace a layer's attention (and the norms that only serve it) by parameter-free stand-ins."""
        if self.has_attention(layer):
            drop_attention(layer, layer_idx, self.structure_names())

    def remove_mlp(self, layer: nn.Module) -> None:
        if self.has_mlp(layer):
            drop_mlp(layer, self.structure_names())

    def sublayer_modules(self, layer: nn.Module, part: str) -> dict[str, nn.Module]:
        """The child modules that removing sub-layer `part` replaces (the sub-layer and its own norms), by
        attribute name: what to put back to undo `remove_attention` / `remove_mlp`."""
        s = self.spec
        names = [s.attn, *s.attn_norms] if part == "attn" else [s.mlp, *s.mlp_norms]
        return {n: getattr(layer, n) for n in names}

    def restore(self, layer: nn.Module, modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            setattr(layer, name, module)

    def structure_names(self) -> dict[str, Any]:
        """Sub-module names written into a heterogeneous checkpoint's config, so that its loader (which
        cannot import prunekit) knows which modules to replace without a table of its own."""
        s = self.spec
        return {
            "layers_path": s.layers,
            "attn": s.attn,
            "mlp": s.mlp,
            "attn_norms": list(s.attn_norms),
            "mlp_norms": list(s.mlp_norms),
        }

    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def attention_blocks(spec: ArchSpec, w: Widths) -> dict[UnitKind, list[UnitBlock]]:
    a, hd = spec.attn, w.head_dim
    q_rows, kv_rows = w.heads * hd, w.kv_heads * hd
    heads = [UnitBlock(f"{a}.{spec.o_proj}", 1, 0, hd, w.heads)]
    kv: list[UnitBlock] = []
    if spec.qkv_proj:
        fused = f"{a}.{spec.qkv_proj}"
        heads.insert(0, UnitBlock(fused, 0, 0, hd, w.heads))
        kv += [UnitBlock(fused, 0, q_rows, hd, w.kv_heads), UnitBlock(fused, 0, q_rows + kv_rows, hd, w.kv_heads)]
    else:
        heads.insert(0, UnitBlock(f"{a}.{spec.q_proj}", 0, 0, hd, w.heads))
        kv += [UnitBlock(f"{a}.{spec.k_proj}", 0, 0, hd, w.kv_heads), UnitBlock(f"{a}.{spec.v_proj}", 0, 0, hd, w.kv_heads)]
    if spec.qk_norm_full_width and spec.q_norm and spec.k_norm:
        heads.append(UnitBlock(f"{a}.{spec.q_norm}", 0, 0, hd, w.heads))
        kv.append(UnitBlock(f"{a}.{spec.k_norm}", 0, 0, hd, w.kv_heads))
    return {"heads": heads, "kv_heads": kv}


def mlp_blocks(spec: ArchSpec, w: Widths) -> dict[UnitKind, list[UnitBlock]]:
    m, c = spec.mlp, w.channels
    down = UnitBlock(f"{m}.{spec.down_proj}", 1, 0, 1, c)
    if spec.gate_up_proj:
        fused = f"{m}.{spec.gate_up_proj}"
        return {"channels": [UnitBlock(fused, 0, 0, 1, c), UnitBlock(fused, 0, c, 1, c), down]}
    rows = [UnitBlock(f"{m}.{name}", 0, 0, 1, c) for name in (spec.gate_proj, spec.up_proj) if name]
    return {"channels": [*rows, down]}
