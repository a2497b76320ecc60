"""Where Mixture-of-Experts families keep their experts: plain data, one row per family.

transformers 5 stores a sparse MLP block's experts as two fused 3D parameters of one `experts` module:
`gate_up_proj` [E, 2I, H] (rows 0..I-1 are the gate projection, rows I..2I-1 the up projection, split by
`chunk(2)`) and `down_proj` [E, H, I]. A router (`gate`, a weight [E, H] without bias in these families)
scores every expert per token: softmax over all E experts, then the top k, renormalised to sum to one
(always in Mixtral, when `norm_topk_prob` in the others). Qwen2-MoE adds a dense shared expert whose output
is scaled by a sigmoid gate and added to the routed experts' sum.

gpt-oss has no row: its fused tensors are [E, H, 2I] with gate and up interleaved and biased, its router has
a bias and picks the top k by logits before the softmax, its MLP returns a tuple (the stand-in for a removed
MLP would have to as well) and its attention sinks are per query head.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoESpec:
    """One family's sparse MLP block, by attribute and config field names."""

    router: str = "gate"  # attribute of the MoE block: the router (a module with `weight` [E, H])
    experts: str = "experts"  # attribute of the MoE block: the module holding the fused expert tensors
    gate_up: str = "gate_up_proj"  # [E, 2I, H]: gate rows then up rows of every expert
    down: str = "down_proj"  # [E, H, I]
    num_experts_field: str = "num_experts"  # config field: experts per MoE layer
    width_field: str = "intermediate_size"  # config field: each expert's intermediate width
    top_k_field: str = "num_experts_per_tok"
    # Whether the top-k router weights are renormalised to sum to one: True (always) or the config flag.
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
