"""Calibration passes: run calibration batches through the decoder stack with hooks that feed the
scoring accumulators. The hooks are the lifecycle; the math lives in `scoring.py` (and, for width
importances, in `importance.py`).

One pass gives all three LLM-Drop scores (block, attention, MLP) per layer: the residual stream is read
at the layer's input, at the input of the module that follows the attention sub-layer (the "mid"
residual), and at the layer's output. The runner remembers each layer's inputs (within a memory budget)
so that, after a change at layer j, a re-score re-runs layers j.. only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.adapters import ModelAdapter
from prunekit.data import CalibrationData
from prunekit.scoring import SimilarityAccumulator, SimilarityScores, unit_rows

# A layer observer is told, for one batch, the layer index and its input/mid/output residual states.
LayerObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


def _first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


@dataclass
class _BatchCache:
    """What is needed to restart one batch at layer k: the layer's input and its call arguments."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)


class CalibrationRunner:
    """Runs calibration data through a model's decoder layers with per-layer observers.

    `state_budget_bytes` bounds the memory spent remembering layer inputs for partial re-runs; with a
    smaller budget only every k-th layer is remembered and a re-run starts at the nearest one below."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, calib: CalibrationData, *, batch_size: int = 4,
                 remember_inputs: bool = False, state_budget_bytes: int = 2 << 30, progress: bool = True):
        self.model = model
        self.adapter = adapter
        self.calib = calib
        self.batch_size = batch_size
        self.progress = progress
        self.batches = calib.batches(batch_size)
        n_layers = adapter.num_layers
        per_layer = calib.input_ids.numel() * adapter.hidden_size * adapter.dtype().itemsize
        stride = max(1, -(-per_layer * n_layers // max(state_budget_bytes, 1)))
        # Remembering inputs costs memory (and fresh allocations) that a one-off pass does not need.
        if not remember_inputs:
            self.cached_layers: set[int] = {0}
        elif per_layer <= state_budget_bytes:
            self.cached_layers = set(range(0, n_layers, stride))
        else:
            self.cached_layers = {0}
        self._cache: list[_BatchCache] | None = None

    def restart_layer(self, start_layer: int) -> int:
        """The layer a run asked to start at `start_layer` really starts at: the nearest remembered layer
        at or below it (layer 0, a full pass from the token ids, before anything is remembered)."""
        if self._cache is None:
            return 0
        return max(k for k in self.cached_layers if k <= start_layer)

    @torch.no_grad()
    def run(self, observers: list[LayerObserver], *, start_layer: int = 0,
            batch_end: Callable[[], None] | None = None, desc: str = "calibration") -> int:
        """Run every batch from `start_layer` (rounded down to a remembered layer); returns the layer the
        run actually started at. `batch_end` is called after each batch (pairwise statistics)."""
        layers = self.adapter.layers()
        start = self.restart_layer(start_layer)
        device = self.adapter.device()
        if self._cache is None:
            self._cache = [_BatchCache() for _ in self.batches]
        state: dict[str, Any] = {}
        handles = []

        def pre_layer(i: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                h = args[0] if args else kwargs["hidden_states"]
                state["in"] = h
                if i in self.cached_layers and i >= start and i > 0:
                    bc = self._cache[state["batch"]]  # type: ignore[index]
                    bc.inputs[i] = h.detach()
                    # Remember how the model called this layer (masks, rotary embeddings, ...), minus the
                    # hidden states, so a later re-run can call it the same way.
                    bc.calls[i] = (tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})
            return hook

        def pre_mid(module: nn.Module, args: tuple[Any, ...]) -> None:
            state["mid"] = args[0]

        def post_layer(i: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
                out = _first_tensor(output)
                for obs in observers:
                    obs(i, state["in"], state["mid"], out, state["mask"])
            return hook

        for i, layer in enumerate(layers):
            if i < start:
                continue
            handles.append(layer.register_forward_pre_hook(pre_layer(i), with_kwargs=True))
            handles.append(self.adapter.mid_residual_module(layer).register_forward_pre_hook(pre_mid))
            handles.append(layer.register_forward_hook(post_layer(i), with_kwargs=True))
        try:
            for b, (ids, mask) in enumerate(tqdm(self.batches, desc=desc, disable=not self.progress, leave=False)):
                state["batch"] = b
                state["mask"] = mask.to(device)
                if start == 0:
                    self.adapter.base_model()(input_ids=ids.to(device), attention_mask=mask.to(device),
                                              use_cache=False)
                else:
                    bc = self._cache[b]
                    h = bc.inputs[start]
                    for i in range(start, len(layers)):
                        args, kwargs = bc.calls[i]
                        h = _first_tensor(layers[i](h, *args, **kwargs))
                if batch_end is not None:
                    batch_end()
        finally:
            for hd in handles:
                hd.remove()
        return start


class SimilarityScorer:
    """LLM-Drop scores for a model, re-scorable after in-place drops (iterative dropping)."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, calib: CalibrationData, *, batch_size: int = 4,
                 pairwise: bool = True, rescore: bool = True, state_budget_bytes: int = 2 << 30,
                 progress: bool = True):
        """`rescore`: remember layer inputs so that `score(start_layer=j)` re-runs layers j.. only."""
        self.runner = CalibrationRunner(model, adapter, calib, batch_size=batch_size, remember_inputs=rescore,
                                        state_budget_bytes=state_budget_bytes, progress=progress)
        self.adapter = adapter
        self.pairwise = pairwise
        self.acc: SimilarityAccumulator | None = None

    def score(self, start_layer: int = 0) -> SimilarityScores:
        """Scores for every layer; with `start_layer` > 0 only layers from there on are re-run (the caller
        guarantees that nothing before `start_layer` changed since the previous call)."""
        n = self.adapter.num_layers
        if self.acc is None or start_layer == 0:
            self.acc = SimilarityAccumulator(n, self.pairwise)
        acc = self.acc
        units: list[torch.Tensor] = []

        def observe(i: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                    mask: torch.Tensor | None) -> None:
            sq_out = acc.update_layer(i, h_in, h_mid, h_out, mask)
            if acc.pair is not None:
                if i == 0:
                    units.clear()
                    units.append(unit_rows(h_in, mask))
                units.append(unit_rows(h_out, mask, sq_out))

        def batch_end() -> None:
            if acc.pair is not None:
                acc.update_pairwise(units)
                units.clear()

        if start_layer > 0:
            # Layers before the restart point keep their sums; the rest are recomputed.
            acc.reset_from(self.runner.restart_layer(start_layer))
        self.runner.run([observe], start_layer=start_layer, batch_end=batch_end, desc="scoring")
        return acc.result(self.runner.calib.describe())
