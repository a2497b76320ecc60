"""`EditableModel`: the full-size model under `compress`'s search, edited in place and reverted.

A candidate is tried on the full-size model: its cut units' columns of every output projection (o_proj /
down_proj) zeroed, the kept ones refitted, which gives exactly the logits of the physically smaller model.
Every edit goes through the layer source (`LayerSource.write`), so a resident and a streamed model are edited
alike, and `reset` undoes what was not committed.

A sub-layer that is kept or removed whole (`ModelAdapter.narrowable`) is one unit owning all its columns. A
block of experts has no output projection: it is seen through the identity map of its output (`stats`), and
removing it zeroes every tensor it adds to the residual stream (`ModelAdapter.residual_outputs`: each
expert's down tensor and bias, a shared expert's down projection), so its output is exactly zero, as the
removed block's.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.compress.budget import SublayerCost, removed
from prunekit.compress.curves import Curve, error_curve, refit, unit_columns
from prunekit.compress.stats import CompressStats, Sublayer, stat_shapes
from prunekit.engine.sources import LayerSource


class EditableModel:
    """The full-size model under search (resident or streamed): which units of every sub-layer are alive, and
    edits as zeroed and refitted output projections, written through the source and undone by `reset`.

    `costs`: the sub-layers that can be cut and what their units cost (`budget.sublayer_costs`)."""

    def __init__(self, source: LayerSource, costs: dict[Sublayer, SublayerCost]):
        self.source, self.adapter, self.costs = source, source.adapter, costs
        layers = self.adapter.layers()
        shapes = stat_shapes(self.adapter)
        # Sub-layers kept or removed whole: their one unit's columns (all of them).
        self.whole: dict[Sublayer, int] = {s: shapes[s][0] for s in costs
                                           if not self.adapter.narrowable(layers[s[0]], s[1])}
        # Blocks without an output projection (of experts): what their removal zeroes.
        self.blocks: dict[Sublayer, list[str]] = {
            s: [self.adapter.layer_prefix(s[0]) + name for name, _ in self.adapter.residual_outputs(layers[s[0]], s[1])]
            for s in costs if not self.adapter.has_output_projection(layers[s[0]], s[1])}
        names = {id(module): name for name, module in self.adapter.model.named_modules()}
        self.names: dict[Sublayer, str] = {s: names[id(self._proj(s))] for s in costs if s not in self.blocks}
        self.alive: dict[Sublayer, list[int]] = {s: list(range(c.units)) for s, c in costs.items()}

    def _proj(self, s: Sublayer) -> nn.Linear:
        return self.adapter.output_projection(self.adapter.layers()[s[0]], s[1])

    def refittable(self, s: Sublayer) -> bool:
        """Whether `s` has an output projection to refit (a block of experts has none)."""
        return s not in self.blocks

    def weight(self, s: Sublayer) -> torch.Tensor:
        """The output projection's weight as it is now (edits included); a block's: the identity, or zero once
        removed."""
        if s in self.blocks:
            d = self.whole[s]
            eye = torch.eye(d, dtype=self.source.dtype)
            return eye if self.alive[s] else torch.zeros_like(eye)
        return self.source.read(self.names[s] + ".weight")

    def cols_per_unit(self, s: Sublayer) -> int:
        """Input columns of the output projection per unit: 1 for an MLP channel, a KV group's heads for
        attention, all of them for a sub-layer kept or removed whole."""
        if s in self.whole:
            return self.whole[s]
        if s[1] == "mlp":
            return 1
        nh, nkv = self.adapter.attention_shape(self.adapter.layers()[s[0]])
        return (nh // nkv) * self.adapter.head_dim

    def curves(self, stats: CompressStats, step: int, order_by: str = "norm") -> dict[Sublayer, Curve]:
        """The error curve of every sub-layer with units alive, units ranked by `order_by`."""
        return self.curves_by_order(stats, step, (order_by,))[order_by]

    def curves_by_order(self, stats: CompressStats, step: int,
                        orders: tuple[str, ...]) -> dict[str, dict[Sublayer, Curve]]:
        """The curves for each unit order, each sub-layer's statistics read once for all orders (a spilled
        Gram comes from disk)."""
        out: dict[str, dict[Sublayer, Curve]] = {o: {} for o in orders}
        for s, alive in self.alive.items():
            if not alive:
                continue
            st, weight = stats.layer(s), self.weight(s)
            for o in orders:
                if s in self.whole:  # one unit: every order is the same
                    out[o][s] = error_curve(st, weight, alive, self.cols_per_unit(s), 1)
                else:
                    out[o][s] = error_curve(st, weight, alive, self.cols_per_unit(s), step if s[1] == "mlp" else 1,
                                            order_by=o)
        return out

    @torch.no_grad()
    def cut(self, stats: CompressStats, curves: dict[Sublayer, Curve], counts: dict[Sublayer, int],
            fit: bool) -> None:
        """Keep the strongest `counts[s]` alive units of each sub-layer, refitting its projection (`fit`) or
        just zeroing what goes."""
        for s, k in counts.items():
            keep = curves[s].order[:k]
            if fit and k:
                new = refit(stats.layer(s), self.weight(s), self.alive[s], keep, self.cols_per_unit(s))
            else:
                new = self.weight(s).clone()
                gone = sorted(set(self.alive[s]) - set(keep))
                if gone:
                    new[:, unit_columns(gone, self.cols_per_unit(s))] = 0
            self.write(s, new, removed=k == 0)
            self.alive[s] = sorted(keep)

    def write(self, s: Sublayer, weight: torch.Tensor, removed: bool) -> None:
        """`weight` as sub-layer `s`'s output projection; `removed`: its bias zeroed too. A block without one is
        only ever removed (everything it adds to the residual stream zeroed) or left as it is."""
        if s in self.blocks:
            for name in self.blocks[s] if removed else ():
                self.source.write(name, torch.zeros_like(self.source.read(name)))
            return
        self.source.write(self.names[s] + ".weight", weight)
        if removed and self._proj(s).bias is not None:  # a removed sub-layer adds nothing
            bias = self.names[s] + ".bias"
            self.source.write(bias, torch.zeros_like(self.source.read(bias)))

    def reset(self) -> None:
        """The dense model again: uncommitted edits reverted, every unit alive."""
        self.source.revert()
        self.alive = {s: list(range(c.units)) for s, c in self.costs.items()}

    def snapshot(self) -> dict[Sublayer, torch.Tensor]:
        """Copies of the edited output projections (those of cut sub-layers)."""
        return {s: self.weight(s).clone() for s, a in self.alive.items() if len(a) < self.costs[s].units}

    def kept_counts(self) -> dict[Sublayer, int]:
        return {s: len(a) for s, a in self.alive.items()}

    def kept(self) -> dict[Sublayer, list[int]]:
        """The alive units of every cut sub-layer (a candidate's `kept`)."""
        return {s: list(a) for s, a in self.alive.items() if len(a) < self.costs[s].units}

    def spent(self, key: str) -> int:
        """How much of `key` ("params" or "kv") the edits remove."""
        return removed(self.costs, self.kept_counts(), key)
