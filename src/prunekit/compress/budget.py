"""Budgets and what each removable unit costs: pure bookkeeping over the adapter's shapes.

A budget is one `key=value` with 0 < value < 1, the fraction of the dense model's resource that may remain:

* ``params``: parameters (a tied embedding counted once), as `count_parameters` counts them;
* ``kv``: KV-cache bytes per token (every layer's K and V heads times head_dim, at full context).

The removable units are one MLP channel (its rows of gate/up and its column of down) and one KV group (the
KV head, its K/V rows, and the query heads that read it: their Q rows and O columns). Removing every unit of
a sub-layer removes the sub-layer (a depth drop), whose norms then go too. A sub-layer whose units cannot be
removed one by one (`ModelAdapter.narrowable`: a block of experts, or attention where the family fixes its
heads) is one unit: all its parameters (every expert, the router, a shared expert and its gate) and all its
KV cache, kept or removed whole. Experts are not units of the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.errors import PlanError
from prunekit.surgery.structure import count_parameters

BUDGET_KEYS: tuple[str, ...] = ("params", "kv")


@dataclass(frozen=True)
class Budget:
    key: str
    keep: float  # fraction of the dense model's resource that may remain

    def describe(self) -> str:
        return f"{self.key}={self.keep:g}"


def parse_budget(text: str) -> Budget:
    """`params=0.8` -> Budget("params", 0.8), or one clear error."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep:
        raise PlanError(f"budget {text!r} must look like KEY=FRACTION, e.g. params=0.8 or kv=0.5")
    if key not in BUDGET_KEYS:
        raise PlanError(f"unknown budget key {key!r}; choose one of {', '.join(BUDGET_KEYS)}")
    try:
        keep = float(value)
    except ValueError:
        raise PlanError(f"budget {text!r}: {value!r} is not a number") from None
    if not 0 < keep < 1:
        raise PlanError(f"budget {text!r}: the fraction to keep must lie strictly between 0 and 1")
    return Budget(key, keep)


@dataclass(frozen=True)
class SublayerCost:
    """What one unit of a sub-layer costs, and what the sub-layer's fixed part (its norms) costs once all its
    units are gone."""

    units: int
    params_per_unit: int
    kv_per_unit: int  # KV-cache elements per token
    fixed_params: int

    def removed(self, key: str, k: int, alive: int | None = None) -> int:
        """`key` removed when `alive` units (default: all) become k; keeping none also removes the norms."""
        per = self.params_per_unit if key == "params" else self.kv_per_unit
        fixed = self.fixed_params if key == "params" and k == 0 else 0
        return ((self.units if alive is None else alive) - k) * per + fixed


def _numel(modules: list[nn.Module | None]) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def sublayer_costs(adapter: ModelAdapter) -> dict[tuple[int, str], SublayerCost]:
    """Costs of every present sub-layer of the (full-size) model, keyed (layer, "attn" | "mlp")."""
    out: dict[tuple[int, str], SublayerCost] = {}
    for i, layer in enumerate(adapter.layers()):
        for part, present in (("attn", adapter.has_attention(layer)), ("mlp", adapter.has_mlp(layer))):
            if present:
                narrow = adapter.narrowable(layer, part)
                out[(i, part)] = (_unit_cost if narrow else _whole_cost)(adapter, layer, part)
    return out


def _unit_cost(adapter: ModelAdapter, layer: nn.Module, part: str) -> SublayerCost:
    """A sub-layer of KV groups or MLP channels; its own norms are the fixed part."""
    if part == "attn":
        nh, nkv = adapter.attention_shape(layer)
        projections = _numel(list(adapter.projections(layer, "attn")))
        norms = _numel([*adapter.qk_norms(layer)]) + _numel([getattr(layer, n) for n in adapter.spec.attn_norms])
        return SublayerCost(nkv, projections // nkv, 2 * adapter.head_dim, norms)
    width = adapter.mlp_width(layer)
    projections = _numel(list(adapter.projections(layer, "mlp")))
    norms = _numel([getattr(layer, n) for n in adapter.spec.mlp_norms])
    # A down_proj bias is not per channel; charging it evenly is close enough for the allocation, and the report
    # counts the real model.
    return SublayerCost(width, projections // width, 0, norms)


def _whole_cost(adapter: ModelAdapter, layer: nn.Module, part: str) -> SublayerCost:
    """A sub-layer kept or removed whole: one unit holding all its parameters (the module's, whatever it holds:
    experts, router, shared expert, attention sinks) and all its KV cache; its own norms are the fixed part."""
    norms = _numel([getattr(layer, n) for n in (adapter.spec.attn_norms if part == "attn" else adapter.spec.mlp_norms)])
    if part == "attn":
        _, nkv = adapter.attention_shape(layer)
        return SublayerCost(1, _numel([adapter.attn(layer)]), nkv * 2 * adapter.head_dim, norms)
    return SublayerCost(1, _numel([adapter.mlp(layer)]), 0, norms)


def dense_total(model: nn.Module, costs: dict[tuple[int, str], SublayerCost], key: str) -> int:
    if key == "params":
        return count_parameters(model)
    return sum(c.units * c.kv_per_unit for c in costs.values())


def removal_target(model: nn.Module, costs: dict[tuple[int, str], SublayerCost], budget: Budget) -> int:
    """How much of the budget's resource must go; one clear error when even removing every removable unit
    would not get there."""
    total = dense_total(model, costs, budget.key)
    need = total - int(budget.keep * total)
    if budget.key == "params":
        removable = sum(c.units * c.params_per_unit + c.fixed_params for c in costs.values())
    else:
        removable = total
    if need > removable:
        floor = (total - removable) / total
        raise PlanError(f"budget {budget.describe()} is impossible: removing every attention and MLP sub-layer "
                        f"still leaves {floor:.3f} of the {budget.key} (embeddings and norms stay)")
    return need


def removed(costs: dict[tuple[int, str], SublayerCost], kept: dict[tuple[int, str], int], key: str) -> int:
    """Resource removed when sub-layer `s` keeps `kept[s]` of its units (absent: all)."""
    return sum(c.removed(key, kept.get(s, c.units)) for s, c in costs.items())
