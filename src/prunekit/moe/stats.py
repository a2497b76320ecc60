"""Expert statistics over the one runner: how often and how strongly the router picks each expert, REAP's
saliency sums, and the gate-weighted activation sums that rank expert channels.

A pre-hook on each MoE block remembers the block's input for the batch; the observer, which is given the
batch's attention mask, routes the real tokens with the family's own router and runs each expert on the
tokens routed to it, so padding never counts. Everything is a float64 sum over tokens, so totals over
data-parallel processes add up (`engine.sums.Summable`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.adapters.moe import MoEAdapter
from prunekit.data import CalibrationData
from prunekit.engine.runner import FiniteCheck, LayerRunner, Observer
from prunekit.engine.sources import LayerSource, as_source
from prunekit.engine.sums import OneProcess, Sums, totalled

_F64 = torch.float64


@dataclass
class LayerExpertSums:
    """Sums over one MoE layer's calibration tokens (E experts, I channels per expert, S shared channels).

    picks[e]: tokens that chose expert e; gates[e]: their router weights summed; reap[e]: router weight x norm of
    the expert's output, summed over them; channels[e, c]: (router weight x activation of channel c)^2 summed
    over them; shared[c]: the same for the shared expert's channels, weighted by its sigmoid gate."""

    tokens: float = 0.0
    picks: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=_F64))
    gates: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=_F64))
    reap: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=_F64))
    channels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=_F64))
    shared: torch.Tensor | None = None

    @classmethod
    def empty(cls, experts: int, width: int, shared: int | None,
              device: torch.device | None = None) -> "LayerExpertSums":
        """Zero sums on `device` (the layer's: no host round trip per batch; `to_tensors` moves them)."""
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=_F64, device=device)

        return cls(0.0, zeros(experts), zeros(experts), zeros(experts), zeros(experts, width),
                   None if shared is None else zeros(shared))


class ExpertStats(dict[int, LayerExpertSums]):
    """`LayerExpertSums` by layer index (MoE layers only): `engine.sums.Summable`."""

    _FIELDS = ("picks", "gates", "reap", "channels", "shared")

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, st in self.items():
            out[f"{i}.tokens"] = torch.tensor([st.tokens], dtype=_F64)
            for name in self._FIELDS:
                t = getattr(st, name)
                if t is not None:
                    out[f"{i}.{name}"] = t.detach().to("cpu", _F64).contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "ExpertStats":
        stats = cls()
        for i in sorted({int(k.split(".")[0]) for k in tensors}):
            stats[i] = LayerExpertSums(float(tensors[f"{i}.tokens"][0]),
                                       *(tensors.get(f"{i}.{name}") for name in cls._FIELDS))  # type: ignore[arg-type]
        return stats


@torch.no_grad()
def add_batch(adapter: MoEAdapter, layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None,
              st: LayerExpertSums) -> None:
    """Fold one batch's MoE-block input `x` [B, T, H] (padding excluded by `mask`) into `st`."""
    h = x.reshape(-1, x.shape[-1])
    if mask is not None:
        h = h[mask.reshape(-1).to(torch.bool)]
    idx, weights = adapter.routing(layer, h)
    st.tokens += h.shape[0]
    for e in range(st.picks.shape[0]):
        token, slot = torch.where(idx == e)
        if token.numel() == 0:
            continue
        g = weights[token, slot].to(_F64)
        hidden = adapter.expert_hidden(layer, e, h[token])
        out = adapter.expert_output(layer, e, hidden)
        st.picks[e] += token.numel()
        st.gates[e] += g.sum()
        st.reap[e] += (g * out.to(_F64).norm(dim=-1)).sum()
        st.channels[e] += ((g[:, None] * hidden.to(_F64)) ** 2).sum(0)
    shared = adapter.shared_projections(layer)
    if shared is not None and st.shared is not None:
        gate, up, _ = shared
        act = adapter.shared_expert(layer).act_fn(gate(h)) * up(h)  # type: ignore[union-attr]
        scale = adapter.shared_gate(layer)
        s = torch.sigmoid(scale(h)).to(_F64) if scale is not None else 1.0
        st.shared += ((s * act.to(_F64)) ** 2).sum(0)


class ExpertStatsObserver(Observer):
    """Collects `ExpertStats` for every MoE layer the runner passes."""

    def __init__(self, adapter: MoEAdapter):
        self.adapter = adapter
        self.stats = ExpertStats()
        self._input: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._layer: nn.Module | None = None  # the MoE layer being observed

    def begin_layer(self, i: int, layer: nn.Module) -> None:
        ad = self.adapter
        if not ad.is_moe(layer):
            return
        shared = ad.shared_projections(layer)
        self.stats[i] = LayerExpertSums.empty(ad.num_experts(layer), ad.expert_width(layer),
                                              None if shared is None else shared[1].out_features,
                                              ad.expert_tensors(layer)[0].device)

        def remember(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._input["x"] = args[0].detach()

        self._handles.append(ad.mlp(layer).register_forward_pre_hook(remember))
        self._layer = layer

    def observe(self, i: int, b: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                mask: torch.Tensor | None) -> None:
        x = self._input.pop("x", None)
        if x is not None and i in self.stats and self._layer is not None:
            add_batch(self.adapter, self._layer, x, mask, self.stats[i])

    def end_layer(self, i: int, layer: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def collect_expert_stats(model: nn.Module | LayerSource, calib: CalibrationData, *, adapter: MoEAdapter | None = None,
                         batch_size: int = 4, sums: Sums | None = None, progress: bool = True) -> ExpertStats:
    """`ExpertStats` of every MoE layer over `calib` (this process's shard), totalled over processes by `sums`."""
    source = as_source(model, adapter)
    obs = ExpertStatsObserver(source.adapter)  # type: ignore[arg-type]
    LayerRunner(source, calib, batch_size=batch_size, remember_inputs=False, progress=progress).run(
        [FiniteCheck(), obs], desc="expert statistics")
    total: Callable[[torch.Tensor], torch.Tensor] = (sums or OneProcess()).total
    return totalled(obs.stats, total)
