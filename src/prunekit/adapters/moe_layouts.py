"""Where Mixture-of-Experts families keep their experts: plain data, one row per family.

transformers 5 stores a sparse MLP block's experts as two fused 3D parameters of one `experts` module:
`gate_up_proj` [E, 2I, H] (rows 0..I-1 are the gate projection, rows I..2I-1 the up projection, split by
`chunk(2)`) and `down_proj` [E, H, I]. A router (`gate`, a weight [E, H] without bias in these families)
scores every expert per token: softmax over all E experts, then the top k, renormalised to sum to one
(always in Mixtral, when `norm_topk_prob` in the others). Qwen2-MoE adds a dense shared expert whose output
is scaled by a sigmoid gate and added to the routed experts' sum.

gpt-oss differs in layout (`layout="interleaved"`): `gate_up_proj` is [E, H, 2I] with gate and up in
alternating columns (gate 2c, up 2c + 1), `down_proj` [E, I, H], both with biases ([E, 2I], [E, H]); its
router has a bias and takes the top k of the logits before a softmax over those k (so the weights always sum
to one); its MLP returns (output, router scores), so the stand-in for a removed MLP does too; and its
attention has a learnt sink per query head, so its heads are not narrowed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoESpec:
    """One family's sparse MLP block, by attribute and config field names."""

    router: str = "gate"  # attribute of the MoE block: the router (a module with `weight` [E, H])
    experts: str = "experts"  # attribute of the MoE block: the module holding the fused expert tensors
    gate_up: str = "gate_up_proj"  # rows: [E, 2I, H], gate rows then up rows; interleaved: [E, H, 2I]
    down: str = "down_proj"  # rows: [E, H, I]; interleaved: [E, I, H]
    layout: str = "rows"  # "rows" or "interleaved" (see the module docstring)
    gate_up_bias: str | None = None  # [E, 2I], where the experts have biases
    down_bias: str | None = None  # [E, H]
    mlp_returns_tuple: bool = False  # the MoE block returns (output, router scores)
    num_experts_field: str = "num_experts"  # config field: experts per MoE layer
    width_field: str = "intermediate_size"  # config field: each expert's intermediate width
    top_k_field: str = "num_experts_per_tok"
    # Whether the top-k router weights sum to one (renormalised, or a softmax over the k): True or the config flag.
    renormalise: bool | str = True
    shared_expert: str | None = None  # a dense MLP every token goes through (Qwen2-MoE)
    shared_gate: str | None = None  # its sigmoid gate, a Linear(H, 1)
    shared_width_field: str | None = None
    # Config field of the width of dense MLP layers in the same model (Qwen MoE's `mlp_only_layers`).
    dense_width_field: str | None = None
    # Why this family's query/KV heads cannot be narrowed, or None where they can.
    fixed_heads: str | None = None


MIXTRAL = MoESpec(num_experts_field="num_local_experts")
QWEN2_MOE = MoESpec(width_field="moe_intermediate_size", renormalise="norm_topk_prob",
                    shared_expert="shared_expert", shared_gate="shared_expert_gate",
                    shared_width_field="shared_expert_intermediate_size", dense_width_field="intermediate_size")
QWEN3_MOE = MoESpec(num_experts_field="num_local_experts", width_field="moe_intermediate_size",
                    renormalise="norm_topk_prob", dense_width_field="intermediate_size")
OLMOE = MoESpec(renormalise="norm_topk_prob",
                fixed_heads="OLMoE normalises q and k over all heads at once, with a q norm sized by hidden_size, "
                            "so no OLMoE config describes fewer heads")
GPT_OSS = MoESpec(router="router", num_experts_field="num_local_experts", layout="interleaved",
                  gate_up_bias="gate_up_proj_bias", down_bias="down_proj_bias", mlp_returns_tuple=True,
                  fixed_heads="gpt-oss has a learnt attention sink per query head")
