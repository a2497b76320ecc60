"""Width statistics over the one runner: per-column squared sums of every layer's `o_proj` and `down_proj`
inputs, the activations TransAct ranks attention heads and MLP channels by.

The pre-hooks on the projections only remember the batch's input tensor; the observer, which is given the
batch's attention mask, folds it into the running sums, so padding is excluded without touching the runner.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.data import CalibrationData
from prunekit.engine.runner import FiniteCheck, LayerRunner, Observer
from prunekit.engine.sources import LayerSource, as_source
from prunekit.engine.sums import CONSTANT
from prunekit.plans import LayerWidth
from prunekit.width.importance import SquaredSums, weight_columns


@dataclass
class LayerActivations:
    """Per-column squared sums of one layer's `o_proj` input (attention) and `down_proj` input (MLP).

    `attn_weight` / `mlp_weight`: what weight-using scorers need of `o_proj` / `down_proj` when the module
    holds no weights any more (a streamed layer is released after its pass): the projection's
    `importance.weight_columns`. None means "read the module's own weight"."""

    attn: SquaredSums | None = None
    mlp: SquaredSums | None = None
    attn_weight: torch.Tensor | None = None
    mlp_weight: torch.Tensor | None = None


class WidthStats(dict[int, LayerActivations]):
    """`LayerActivations` by layer index: `engine.sums.Summable`, so totals over processes and the cache
    need no knowledge of its fields. Names are "<layer>.<attn|mlp>.<sums|tokens>" and the weight columns
    (the same in every process) "const:<layer>.<part>.weight"; a layer with neither part keeps an empty
    marker so the layer set round-trips."""

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, st in self.items():
            out[f"{i}.present"] = torch.zeros(0, dtype=torch.float64)
            for part in ("attn", "mlp"):
                acc = getattr(st, part)
                if acc is None:
                    continue
                out[f"{i}.{part}.sums"] = acc.sums.detach().to("cpu", torch.float64).contiguous()
                out[f"{i}.{part}.tokens"] = torch.tensor([float(acc.tokens)], dtype=torch.float64)
                w = getattr(st, f"{part}_weight")
                if w is not None:
                    out[f"{CONSTANT}{i}.{part}.weight"] = w.detach().to("cpu", torch.float64).contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "WidthStats":
        stats = cls()
        for i in sorted({int(k.removeprefix(CONSTANT).split(".")[0]) for k in tensors}):
            st = LayerActivations()
            for part in ("attn", "mlp"):
                sums = tensors.get(f"{i}.{part}.sums")
                if sums is None:
                    continue
                acc = SquaredSums(sums.shape[0])
                acc.sums.copy_(sums)
                acc.tokens = int(tensors[f"{i}.{part}.tokens"][0])
                setattr(st, part, acc)
                setattr(st, f"{part}_weight", tensors.get(f"{CONSTANT}{i}.{part}.weight"))
            stats[i] = st
        return stats


class WidthCollector(Protocol):
    """Gathers `LayerActivations` for every layer of the model as it is now. `widths` are the current kept
    widths as ORIGINAL indices (what `width_prune` has cut so far); an in-memory model is already narrowed
    and ignores them, a streamed one needs them to cut each layer as it reads it from the files."""

    def collect(self, *, attn: bool = True, mlp: bool = True, desc: str = "width scoring",
                widths: Mapping[int, LayerWidth] | None = None) -> WidthStats: ...


def watch_layer(adapter: ModelAdapter, layer: nn.Module, pending: dict[str, torch.Tensor], *, attn: bool = True,
                mlp: bool = True, keep_weights: bool = False) -> tuple[LayerActivations, list[Any]]:
    """Empty statistics for one layer plus pre-hooks (returned, for removal) that put the batch's `o_proj` /
    `down_proj` input into `pending["attn"]` / `pending["mlp"]`; `fold_pending` then adds them with the
    batch's mask. Used by the in-memory `ActivationCollector` and the streamed `WidthStatsObserver`.
    `keep_weights`: also keep the projections' `weight_columns`, for when the layer's weights will be gone
    by the time the scorer runs (streaming)."""
    st = LayerActivations()
    handles: list[Any] = []

    def remember(what: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            pending[what] = args[0].detach()
        return hook

    if attn and adapter.has_attention(layer):
        o = adapter.output_projection(layer, "attn")
        st.attn = SquaredSums(o.in_features, device=o.weight.device)
        handles.append(o.register_forward_pre_hook(remember("attn")))
        if keep_weights:
            st.attn_weight = weight_columns(o.weight).cpu()
    if mlp and adapter.has_mlp(layer):
        down = adapter.output_projection(layer, "mlp")
        st.mlp = SquaredSums(down.in_features, device=down.weight.device)
        handles.append(down.register_forward_pre_hook(remember("mlp")))
        if keep_weights:
            st.mlp_weight = weight_columns(down.weight).cpu()
    return st, handles


def fold_pending(st: LayerActivations, pending: dict[str, torch.Tensor], mask: torch.Tensor | None) -> None:
    """Add the inputs `watch_layer`'s hooks remembered for one batch to the sums, padding excluded."""
    for what, acc in (("attn", st.attn), ("mlp", st.mlp)):
        x = pending.pop(what, None)
        if acc is not None and x is not None:
            acc.update(x, mask)


class WidthStatsObserver(Observer):
    """Collects `LayerActivations` for every layer the runner passes (`stats[i]`). With `keep_weights` it also
    keeps the output projections' `importance.weight_columns` (the weight-activation scorer needs them after
    a streamed layer is released; one vector per projection, not the weight)."""

    def __init__(self, adapter: ModelAdapter, *, attn: bool = True, mlp: bool = True, keep_weights: bool = False):
        self.adapter = adapter
        self.attn, self.mlp, self.keep_weights = attn, mlp, keep_weights
        self.stats = WidthStats()
        self._pending: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def begin_layer(self, i: int, layer: nn.Module) -> None:
        self.stats[i], self._handles = watch_layer(self.adapter, layer, self._pending, attn=self.attn,
                                                   mlp=self.mlp, keep_weights=self.keep_weights)

    def observe(self, i: int, b: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                mask: torch.Tensor | None) -> None:
        fold_pending(self.stats[i], self._pending, mask)

    def end_layer(self, i: int, layer: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class ActivationCollector:
    """The `WidthCollector` over the one runner, for a model in memory or any `LayerSource`; reusable across
    shots. Every shot changes every layer it narrows, so each pass starts at layer 0 from the kept embedding
    output. `widths` (the kept ORIGINAL indices so far) tell a streamed source how to cut each layer it
    reads; a resident model is already narrowed."""

    def __init__(self, model: nn.Module | LayerSource, calib: CalibrationData, *, adapter: ModelAdapter | None = None,
                 batch_size: int = 4, work_dir: str | Path | None = None, keep_weights: bool = False,
                 check_overflow: bool = True, progress: bool = True):
        self.source = as_source(model, adapter)
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.runner = LayerRunner(self.source, calib, batch_size=batch_size, work_dir=self.work_dir,
                                  remember_inputs=False, progress=progress)
        self.keep_weights = keep_weights
        self.check = check_overflow

    def collect(self, *, attn: bool = True, mlp: bool = True, desc: str = "width scoring",
                widths: Mapping[int, LayerWidth] | None = None) -> WidthStats:
        self.source.set_widths(dict(widths or {}))
        obs = WidthStatsObserver(self.source.adapter, attn=attn, mlp=mlp, keep_weights=self.keep_weights)
        self.runner.run([FiniteCheck(), obs] if self.check else [obs], start_layer=0, desc=desc)
        return obs.stats

    def cleanup(self) -> None:
        """Remove the work directory (hidden states; width runs resume from the cache, not from them)."""
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
