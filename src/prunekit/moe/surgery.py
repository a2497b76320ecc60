"""Expert surgery, in place: remove whole experts (their slices of the fused tensors and their router rows)
and narrow every expert of a layer to kept intermediate channels (and a shared expert to its own).

Routing stays valid: top-k never exceeds the experts left, and the family's router code is untouched, so
its normalisation (softmax over all experts, top k, renormalised or not) applies to the experts that remain.
With renormalisation, removing an expert a token never picks changes nothing for that token; without it,
the softmax's denominator loses that expert's share, exactly zero only for an expert whose logit is -inf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.adapters.moe import MoEAdapter
from prunekit.adapters.units import Cut, ExpertCut, apply_cut
from prunekit.errors import PlanError
from prunekit.plans import LayerWidth, check_kept

# Integer attributes the families' modules cache: the expert count (router, experts module, block) and top-k.
_COUNT_ATTRS = ("num_experts", "num_local_experts")
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok")
_WIDTH_ATTRS = ("intermediate_dim", "intermediate_size")


# transformers runs experts with grouped matrix kernels that need every row of the fused tensors to start on a
# 16-byte boundary (`down_proj` [E, H, I], gpt-oss's `gate_up_proj` [E, H, 2I]): I a multiple of 8 covers
# 16-bit weights (and float32).
EXPERT_WIDTH_MULTIPLE = 8


def is_moe_layer(adapter: ModelAdapter, layer: nn.Module) -> bool:
    return isinstance(adapter, MoEAdapter) and adapter.is_moe(layer)


def check_expert_plan(adapter: ModelAdapter, widths: dict[int, LayerWidth]) -> None:
    """`PlanError` when a plan keeps experts or shared-expert channels of a model without experts."""
    moe = isinstance(adapter, MoEAdapter)
    for i, w in sorted(widths.items()):
        if not moe and (w.experts is not None or w.shared_channels is not None):
            raise PlanError(f"the plan keeps experts of layer {i}, but {adapter.spec.family} has no experts")
        if moe and w.shared_channels is not None and not adapter.moe.shared_expert:  # type: ignore[attr-defined]
            raise PlanError(f"the plan narrows the shared expert of layer {i}, but {adapter.spec.family} has none")


@dataclass
class MoEWidth:
    """Validated kept indices (ascending, current numbering) of one MoE layer; None: unchanged."""

    experts: list[int] | None = None
    channels: list[list[int]] | None = None  # per expert (of the layer before `experts` applies)
    shared: list[int] | None = None


def _kept(name: str, layer: int, idx: list[int] | None, size: int) -> list[int] | None:
    """Sorted, checked indices, or None when they keep everything (already narrowed, or a no-op)."""
    return None if idx is None or len(idx) == size else check_kept(name, layer, idx, size)


def resolve_moe_width(adapter: MoEAdapter, i: int, layer: nn.Module, w: LayerWidth) -> MoEWidth:
    shared = adapter.shared_projections(layer)
    if w.shared_channels is not None and shared is None:
        raise PlanError(f"the plan narrows the shared expert of layer {i}, which has none")
    n_experts, width = adapter.num_experts(layer), adapter.expert_width(layer)
    channels = None
    if w.channels is not None:
        channels = _kept("expert channels", i, w.channels, width)
        channels = None if channels is None else [channels] * n_experts
    elif w.expert_channels is not None:
        channels = _per_expert(i, w, n_experts, width)
    if channels is not None and len(channels[0]) % EXPERT_WIDTH_MULTIPLE:
        raise PlanError(f"layer {i}: experts must keep a multiple of {EXPERT_WIDTH_MULTIPLE} channels (transformers' "
                        f"grouped expert kernels need it), not {len(channels[0])}")
    return MoEWidth(
        experts=_kept("experts", i, w.experts, n_experts),
        channels=channels,
        shared=None if shared is None else _kept("shared-expert channels", i, w.shared_channels,
                                                 shared[1].out_features),
    )


def _per_expert(i: int, w: LayerWidth, n_experts: int, width: int) -> list[list[int]] | None:
    """Checked per-expert kept channels for the layer's current experts (the plan lists the original ones; a
    layer whose experts the plan already removed takes the kept experts' lists), or None if unchanged."""
    lists = w.expert_channels or []
    if len(lists) != n_experts and w.experts is not None and len(w.experts) == n_experts:
        lists = [lists[e] for e in sorted(w.experts) if e < len(lists)]
    if len(lists) != n_experts:
        raise PlanError(f"layer {i}: the plan lists the channels of {len(w.expert_channels or [])} experts, but the "
                        f"layer has {n_experts}")
    if len(lists[0]) == width:
        return None
    return [_kept("expert channels", i, k, width) or list(range(width)) for k in lists]


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _set_ints(modules: list[nn.Module], names: tuple[str, ...], value: int) -> None:
    for m in modules:
        for name in names:
            if isinstance(getattr(m, name, None), int):
                setattr(m, name, value)


def _by_expert(adapter: MoEAdapter, layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every tensor indexed by expert along its first axis: the fused expert tensors,
    their biases, the router's weight and bias."""
    experts, router, m = adapter.experts(layer), adapter.router(layer), adapter.moe
    out = [(experts, name) for name in (m.gate_up, m.down, m.gate_up_bias, m.down_bias) if name]
    return out + [(router, name) for name in ("weight", "bias") if isinstance(getattr(router, name, None), torch.Tensor)]


@dataclass
class _Removed:
    """What `experts_removed` took out of one layer: the removed experts' slices, and the integers it changed."""

    kept: list[int]
    gone: list[int]
    rows: dict[tuple[nn.Module, str], torch.Tensor]
    ints: dict[tuple[nn.Module, str], int]


@contextmanager
def experts_removed(adapter: MoEAdapter, kept: dict[int, list[int]]) -> Iterator[None]:
    """The model with only experts `kept[i]` of each MoE layer i, physically (`apply_moe_width`: routing over
    fewer experts is not the same as silencing some), then exactly as it was: only the removed experts' slices
    are held meanwhile, and put back in their places."""
    taken: list[_Removed] = []
    try:
        for i, keep in sorted(kept.items()):
            taken.append(_take_out(adapter, adapter.layers()[i], keep))
        yield
    finally:
        for removed in taken:
            _put_back(removed)


@torch.no_grad()
def _take_out(adapter: MoEAdapter, layer: nn.Module, kept: list[int]) -> _Removed:
    gone = [e for e in range(adapter.num_experts(layer)) if e not in set(kept)]
    rows = {}
    for mod, name in _by_expert(adapter, layer):
        t = getattr(mod, name).detach()
        rows[(mod, name)] = t.index_select(0, torch.tensor(gone, device=t.device))
    modules = (adapter.mlp(layer), adapter.router(layer), adapter.experts(layer))
    ints = {(mod, name): getattr(mod, name) for mod in modules for name in (*_COUNT_ATTRS, *_TOP_K_ATTRS)
            if isinstance(getattr(mod, name, None), int)}
    apply_moe_width(adapter, layer, MoEWidth(experts=sorted(kept)))
    return _Removed(sorted(kept), gone, rows, ints)


@torch.no_grad()
def _put_back(r: _Removed) -> None:
    for (mod, name), removed in r.rows.items():
        now = getattr(mod, name).detach()
        full = now.new_empty((len(r.kept) + len(r.gone), *now.shape[1:]))
        full[torch.tensor(r.kept, device=full.device)] = now
        full[torch.tensor(r.gone, device=full.device)] = removed
        _replace(mod, name, full)
    for (mod, name), value in r.ints.items():
        setattr(mod, name, value)


@torch.no_grad()
def apply_moe_width(adapter: MoEAdapter, layer: nn.Module, w: MoEWidth) -> None:
    """Cut the layer's fused expert tensors, router rows and shared expert as `expert_slices` says (the cuts the
    streamed reader takes from the files too), then update the counts its modules cache: top-k capped at the
    experts left."""
    kept = LayerWidth(experts=w.experts, expert_channels=w.channels, shared_channels=w.shared)
    modules = dict(layer.named_modules())
    for name, cut in expert_slices(adapter, layer, kept, adapter.expert_width(layer)).items():
        path, _, attr = name.rpartition(".")
        _replace(modules[path], attr, apply_cut(getattr(modules[path], attr).detach(), cut))
    if w.channels is not None:
        _set_ints([adapter.experts(layer)], _WIDTH_ATTRS, len(w.channels[0]))
    if w.experts is not None:
        cached = [adapter.mlp(layer), adapter.router(layer), adapter.experts(layer)]
        top_k = min(adapter.top_k(layer), len(w.experts))
        _set_ints(cached, _COUNT_ATTRS, len(w.experts))
        _set_ints(cached, _TOP_K_ATTRS, top_k)
    shared = adapter.shared_projections(layer)
    if w.shared is not None and shared is not None:
        gate, up, down = shared
        gate.out_features = up.out_features = down.in_features = len(w.shared)
        _set_ints([adapter.shared_expert(layer)], ("intermediate_size",), len(w.shared))


def expert_slices(adapter: MoEAdapter, layer: nn.Module, w: LayerWidth, width: int) -> dict[str, Cut]:
    """What keeping `w`'s experts and channels cuts from a MoE layer's tensors, by name relative to the layer:
    router rows, an `ExpertCut` of each fused expert tensor, shared-expert rows and columns. `w` indexes the
    stored tensors and `width` is their expert width (gate_up's up rows start there): the layer's own for
    `apply_moe_width` in memory, the original checkpoint's for the streamed reader, which reads a narrowed
    layer from the files with these. The layer's modules give only the names."""
    names = {id(m): n for n, m in layer.named_modules()}
    m = adapter.moe
    experts = None if w.experts is None else tuple(sorted(w.experts))
    out: dict[str, Cut] = {}
    if experts is not None:
        router = names[id(adapter.router(layer))]
        for name in ("weight", "bias"):
            if isinstance(getattr(adapter.router(layer), name, None), torch.Tensor):
                out[f"{router}.{name}"] = (0, torch.tensor(experts))
    channels: torch.Tensor | dict[int, torch.Tensor] | None = None
    if w.expert_channels is not None:
        channels = {e: torch.tensor(sorted(c)) for e, c in enumerate(w.expert_channels)}
    elif w.channels is not None:
        channels = torch.tensor(sorted(w.channels))
    if experts is not None or channels is not None:
        ex = names[id(adapter.experts(layer))]
        for tensor, (dim, rows) in _expert_rows(m.layout, channels, width).items():
            name = getattr(m, tensor)
            if name:
                out[f"{ex}.{name}"] = ExpertCut(experts, dim, rows)
    shared = adapter.shared_projections(layer)
    if w.shared_channels is not None and shared is not None:
        idx = torch.tensor(sorted(w.shared_channels))
        for lin, dim in zip(shared, (0, 0, 1)):
            out[f"{names[id(lin)]}.weight"] = (dim, idx)
            if dim == 0 and getattr(lin, "bias", None) is not None:
                out[f"{names[id(lin)]}.bias"] = (0, idx)
    return out


_Rows = torch.Tensor | dict[int, torch.Tensor] | None


def _expert_rows(layout: str, channels: _Rows, width: int) -> dict[str, tuple[int, _Rows]]:
    """{MoESpec field of an expert tensor: (dim of one expert's slice, its kept entries)} for kept channels
    `channels` (one index for all experts, or one per expert; None: all), in the family's layout."""
    def each(f: Callable[[torch.Tensor], torch.Tensor]) -> _Rows:
        if channels is None:
            return None
        return {e: f(c) for e, c in channels.items()} if isinstance(channels, dict) else f(channels)

    if layout == "interleaved":  # gate_up [E, H, 2I] (gate 2c, up 2c + 1), its bias [E, 2I], down [E, I, H]
        pairs = each(lambda c: torch.stack([2 * c, 2 * c + 1], dim=-1).reshape(-1))
        return {"gate_up": (1, pairs), "gate_up_bias": (0, pairs), "down": (0, each(lambda c: c)),
                "down_bias": (0, None)}
    # gate_up [E, 2I, H] (gate rows, then up rows), down [E, H, I]
    return {"gate_up": (0, each(lambda c: torch.cat([c, c + width]))), "down": (1, each(lambda c: c))}
