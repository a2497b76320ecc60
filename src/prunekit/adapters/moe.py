"""`MoEAdapter`: the adapter of Mixture-of-Experts families, the only code that knows where their experts,
routers and shared experts live (after the family's `MoESpec` row, `adapters.moe_layouts`).

Prunable units of a sparse MLP block, and the tensor slices each owns (E experts, I channels per expert,
H hidden size, gate_up [E, 2I, H], down [E, H, I], router weight [E, H]; gpt-oss's interleaved layout in
brackets):

- an expert e: `gate_up[e]`, `down[e]`, the router row `weight[e]` (and the expert and router biases' entry
  e where there are some);
- channel c of expert e (every expert of a layer keeps the same number, since the fused tensors need one
  width): `gate_up[e, c]`, `gate_up[e, I + c]` and `down[e, :, c]` [`gate_up[e, :, 2c]`, `gate_up[e, :, 2c+1]`,
  their biases, `down[e, c]`];
- a shared-expert channel c (Qwen2-MoE): row c of its gate and up projections, column c of its down.

The config fields a layer's widths are written to are the family's (`num_local_experts` or `num_experts`,
`intermediate_size` or `moe_intermediate_size`, `num_experts_per_tok`, `shared_expert_intermediate_size`),
so a model whose MoE layers agree gets a stock config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.adapters.base import ModelAdapter
from prunekit.adapters.moe_layouts import MoESpec
from prunekit.errors import PlanError, UnsupportedArchitectureError
from prunekit.plans import LayerWidth


class MoEAdapter(ModelAdapter):
    """`ModelAdapter` for a family with sparse MLP blocks; dense layers of the same model (Qwen MoE's
    `mlp_only_layers`) answer as in a dense model."""

    @property
    def moe(self) -> MoESpec:
        assert self.spec.moe is not None
        return self.spec.moe

    # --- modules ------------------------------------------------------------------------------------------
    def is_moe(self, layer: nn.Module) -> bool:
        """Whether the layer's MLP is a sparse expert block (not removed, not a dense MLP)."""
        return self.has_mlp(layer) and isinstance(getattr(self.mlp(layer), self.moe.experts, None), nn.Module)

    def moe_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers()) if self.is_moe(layer)]

    def experts(self, layer: nn.Module) -> nn.Module:
        return getattr(self.mlp(layer), self.moe.experts)

    def router(self, layer: nn.Module) -> nn.Module:
        return getattr(self.mlp(layer), self.moe.router)

    def expert_tensors(self, layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
        """(gate_up [E, 2I, H], down [E, H, I]) of a MoE layer."""
        ex = self.experts(layer)
        return getattr(ex, self.moe.gate_up), getattr(ex, self.moe.down)

    def shared_expert(self, layer: nn.Module) -> nn.Module | None:
        return getattr(self.mlp(layer), self.moe.shared_expert) if self.moe.shared_expert else None

    def shared_gate(self, layer: nn.Module) -> nn.Module | None:
        return getattr(self.mlp(layer), self.moe.shared_gate) if self.moe.shared_gate else None

    def shared_projections(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
        """(gate, up, down) of the layer's shared expert, or None."""
        shared = self.shared_expert(layer)
        if shared is None:
            return None
        s = self.spec
        return getattr(shared, s.gate_proj), getattr(shared, s.up_proj), getattr(shared, s.down_proj)

    # --- routing facts ------------------------------------------------------------------------------------
    def num_experts(self, layer: nn.Module) -> int:
        return int(self.expert_tensors(layer)[0].shape[0])

    def expert_width(self, layer: nn.Module) -> int:
        return int(self.expert_tensors(layer)[1].shape[1 if self.moe.layout == "interleaved" else -1])

    def expert_biases(self, layer: nn.Module) -> tuple[nn.Parameter | None, nn.Parameter | None]:
        """(gate_up bias [E, 2I], down bias [E, H]) where the family's experts have them."""
        ex, m = self.experts(layer), self.moe
        return (getattr(ex, m.gate_up_bias) if m.gate_up_bias else None,
                getattr(ex, m.down_bias) if m.down_bias else None)

    def expert_params(self, layer: nn.Module) -> int:
        """Parameters one expert of a MoE layer owns: its slices of the fused tensors and their biases, and its
        router row (and router bias entry)."""
        router = self.router(layer)
        tensors = [*self.expert_tensors(layer), *self.expert_biases(layer), router.weight, getattr(router, "bias", None)]
        return sum(t.numel() for t in tensors if isinstance(t, torch.Tensor)) // self.num_experts(layer)

    def top_k(self, layer: nn.Module) -> int:
        return int(self.router(layer).top_k)

    def renormalises(self) -> bool:
        """Whether the top-k router weights are renormalised to sum to one."""
        flag = self.moe.renormalise
        return bool(getattr(self.config, flag)) if isinstance(flag, str) else bool(flag)

    def routing(self, layer: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k expert indices, their weights), both [tokens, k], for the MLP input `h` [..., H], as the
        family's router computes them."""
        _, weights, idx = self.router(layer)(h.reshape(-1, h.shape[-1]))
        return idx, weights

    def expert_hidden(self, layer: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `e`'s intermediate activations act(gate x) * (up x) for tokens `x` [n, H]: [n, I]."""
        gate_up, _ = self.expert_tensors(layer)
        bias, _ = self.expert_biases(layer)
        w = gate_up[e] if self.moe.layout == "interleaved" else gate_up[e].T
        out = x @ w + (bias[e] if bias is not None else 0)
        return self.experts(layer)._apply_gate(out)  # the family's own activation and gate/up split

    def expert_output(self, layer: nn.Module, e: int, hidden: torch.Tensor) -> torch.Tensor:
        """Expert `e`'s output [n, H] from its intermediate activations [n, I] (before the router weight)."""
        down = self.expert_tensors(layer)[1][e]
        _, bias = self.expert_biases(layer)
        out = hidden @ (down if self.moe.layout == "interleaved" else down.T)
        return out + bias[e] if bias is not None else out

    def attention_sinks(self, layer: nn.Module) -> nn.Parameter | None:
        """gpt-oss's learnt sink logit per query head [n_head], or None where the family has none."""
        return getattr(self.attn(layer), "sinks", None)

    # --- shapes -------------------------------------------------------------------------------------------
    def mlp_width(self, layer: nn.Module) -> int:
        return self.expert_width(layer) if self.is_moe(layer) else super().mlp_width(layer)

    def _no_projections(self) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(
            f"{self.spec.family}'s MLP is a block of experts held in fused tensors, not three projections; "
            "this method does not support Mixture-of-Experts models yet")

    def mlp_projections(self, layer: nn.Module) -> tuple[nn.Linear | None, nn.Linear, nn.Linear]:
        if self.is_moe(layer):
            raise self._no_projections()
        return super().mlp_projections(layer)

    def input_projections(self, layer: nn.Module, part: str) -> list[nn.Linear]:
        if part == "mlp" and self.is_moe(layer):
            raise self._no_projections()
        return super().input_projections(layer, part)

    def output_projection(self, layer: nn.Module, part: str) -> nn.Linear:
        if part == "mlp" and self.is_moe(layer):
            raise self._no_projections()
        return super().output_projection(layer, part)

    def residual_outputs(self, layer: nn.Module, part: str) -> list[tuple[str, int]]:
        """A MoE block's output is the router-weighted sum of its experts' outputs (plus the gated shared
        expert's), each linear in its down projection and bias, so a map of the block's output folds into every
        expert's down tensor and bias, and the shared expert's down projection."""
        if part != "mlp" or not self.is_moe(layer):
            return super().residual_outputs(layer, part)
        m, s = self.moe, self.spec
        experts = f"{s.mlp}.{m.experts}"
        out = [(f"{experts}.{m.down}", 2 if m.layout == "interleaved" else 1)]
        if m.down_bias:
            out.append((f"{experts}.{m.down_bias}", 1))
        shared = self.shared_projections(layer)
        if shared is not None:
            name = f"{s.mlp}.{m.shared_expert}.{s.down_proj}"
            out += [(f"{name}.weight", 0), *([(f"{name}.bias", 0)] if shared[2].bias is not None else [])]
        return out

    def has_output_projection(self, layer: nn.Module, part: str) -> bool:
        return not (part == "mlp" and self.is_moe(layer))

    def narrowable(self, layer: nn.Module, part: str) -> bool:
        """A MoE block is kept or removed whole (its experts and their channels are units of `drop --target
        expert` and `width`, not of `compress`); attention where the family fixes its heads likewise."""
        if part == "attn":
            return self.moe.fixed_heads is None
        return not self.is_moe(layer)

    def mlp_macs(self, layer: nn.Module) -> int:
        """Per token: the router, the top-k experts it runs (gate, up and down) and a shared expert with its gate."""
        if not self.is_moe(layer):
            return super().mlp_macs(layer)
        h, n = self.hidden_size, self.expert_width(layer)
        macs = self.num_experts(layer) * h + self.top_k(layer) * 3 * h * n
        shared = self.shared_projections(layer)
        if shared is not None:
            macs += 3 * h * shared[1].out_features + (h if self.shared_gate(layer) is not None else 0)
        return macs

    def layer_widths(self, layer: nn.Module) -> dict[str, int]:
        out = super().layer_widths(layer) if not self.is_moe(layer) else self._attention_widths(layer)
        if self.is_moe(layer):
            m = self.moe
            out[m.num_experts_field] = self.num_experts(layer)
            out[m.width_field] = self.expert_width(layer)
            out[m.top_k_field] = self.top_k(layer)
            shared = self.shared_projections(layer)
            if shared is not None and m.shared_width_field:
                out[m.shared_width_field] = shared[1].out_features
        return out

    def _attention_widths(self, layer: nn.Module) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.has_attention(layer):
            out["num_attention_heads"], out["num_key_value_heads"] = self.attention_shape(layer)
        return out

    def check_narrow_heads(self) -> None:
        if self.moe.fixed_heads:
            raise PlanError(f"cannot narrow the attention heads of {self.spec.family}: {self.moe.fixed_heads}")

    def width_fields(self) -> tuple[str, ...]:
        m = self.moe
        extra = [m.num_experts_field, m.width_field, m.top_k_field, m.shared_width_field, m.dense_width_field]
        return tuple(dict.fromkeys([*super().width_fields(), *(f for f in extra if f)]))

    def mlp_fields(self) -> tuple[str, ...]:
        m = self.moe
        fields = [m.num_experts_field, m.width_field, m.top_k_field, m.shared_width_field, m.dense_width_field,
                  "intermediate_size"]
        return tuple(dict.fromkeys(f for f in fields if f))

    def planned_widths(self, layer: nn.Module, w: LayerWidth) -> dict[str, int]:
        if not self.is_moe(layer):
            return super().planned_widths(layer, w)
        out = {k: v for k, v in super().planned_widths(layer, w).items() if k != "intermediate_size"}
        m = self.moe
        if w.channels is not None:
            out[m.width_field] = len(w.channels)
        if w.expert_channels is not None:
            out[m.width_field] = len(w.expert_channels[0])
        if w.experts is not None:
            out[m.num_experts_field] = len(w.experts)
        if w.shared_channels is not None and m.shared_width_field:
            out[m.shared_width_field] = len(w.shared_channels)
        return out

    def structure_names(self) -> dict[str, Any]:
        # The loader rebuilds a layer's MLP from a per-layer config when one of these fields differs.
        names = {**super().structure_names(), "mlp_fields": list(self.mlp_fields())}
        if self.moe.mlp_returns_tuple:  # the stand-in for a removed MLP returns (output, None) as the block does
            names["mlp_output"] = "tuple"
        return names
