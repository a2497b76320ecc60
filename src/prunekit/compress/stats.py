"""The statistics `compress` allocates by, from one forward and backward pass over the calibration tokens.

For every present sub-layer, with x_t the input of its output projection (o_proj / down_proj) at token t and
g_t the gradient of the summed calibration loss with respect to that projection's output:

* G = sum_t x_t x_t'  (input Gram; [in, in]): what a least-squares refit of the projection needs, and the
  TransAct activation norms (its diagonal);
* F = sum_t g_t g_t'  (output Fisher; [d, d]): how much the loss cares about an error in the projection's
  output, direction by direction.

Under the Kronecker (K-FAC) approximation E[(g'Rx)^2] ~ tr(F R G R') / T, the loss increase of replacing the
projection's weight W by W + R is about tr(F R G R') / (2T): one number per candidate that compares sub-layers
of different depths and kinds on the same scale, which cosine similarities and activation norms cannot.

Why not the one layer runner: it runs forward only, layer by layer, and a gradient needs the whole graph, so
`compress` works on a model in memory. The sums are float64 (each batch's product is taken in the model's
dtype, then accumulated), and padding tokens are excluded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.adapters import ModelAdapter
from prunekit.data import CalibrationData
from prunekit.errors import ActivationOverflowError
from prunekit.losses import token_nll
from prunekit.width.importance import masked_rows

Sublayer = tuple[int, str]  # (layer index, "attn" | "mlp")


@dataclass
class SublayerStats:
    gram: torch.Tensor  # [in, in] float64
    fisher: torch.Tensor  # [d, d] float64
    tokens: int = 0


@dataclass
class CompressStats:
    layers: dict[Sublayer, SublayerStats] = field(default_factory=dict)
    loss: float = 0.0  # mean calibration NLL of the model the statistics were taken on
    tokens: int = 0


def _outer(rows: torch.Tensor) -> torch.Tensor:
    return (rows.T @ rows).to(torch.float64)


class _Hooks:
    """Forward hooks on every output projection that fold the input Gram in at once and register a tensor
    hook for the output's gradient (folded in during backward)."""

    def __init__(self, adapter: ModelAdapter, stats: CompressStats):
        self.stats = stats
        self.mask: torch.Tensor | None = None
        self.handles: list[Any] = []
        for i, layer in enumerate(adapter.layers()):
            for part, present in (("attn", adapter.has_attention(layer)), ("mlp", adapter.has_mlp(layer))):
                if present:
                    proj = adapter.output_projection(layer, part)
                    stats.layers[(i, part)] = SublayerStats(
                        torch.zeros(proj.in_features, proj.in_features, dtype=torch.float64),
                        torch.zeros(proj.out_features, proj.out_features, dtype=torch.float64))
                    self.handles.append(proj.register_forward_hook(self._hook((i, part))))

    def _hook(self, key: Sublayer) -> Any:
        def forward(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            st = self.stats.layers[key]
            mask = self.mask
            rows = masked_rows(args[0].detach(), mask).to(args[0].dtype)
            st.gram += _outer(rows).cpu()
            st.tokens += int(rows.shape[0])

            def backward(grad: torch.Tensor) -> None:
                st.fisher += _outer(masked_rows(grad, mask).to(grad.dtype)).cpu()

            if out.requires_grad:
                out.register_hook(backward)
        return forward

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextmanager
def _grad_from_embeddings(adapter: ModelAdapter) -> Iterator[None]:
    """Gradients flow from the embedding output on, so no weight needs `requires_grad` (nothing is trained,
    and no weight gradient is ever stored)."""
    handle = adapter.embed().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


def _same(values: torch.Tensor) -> torch.Tensor:
    return values


def collect_stats(model: nn.Module, adapter: ModelAdapter, calib: CalibrationData, *, batch_size: int = 1,
                  progress: bool = True, desc: str = "compress statistics",
                  total: Callable[[torch.Tensor], torch.Tensor] = _same) -> CompressStats:
    """Gram and Fisher of every present sub-layer of `model` (see the module docstring). `total` turns this
    process's float64 sums into the sums over every process (under torchrun each rank passes its own share
    of the batches and an all-reduce); in one process it is the identity.

    `batch_size`: sequences per forward+backward, default 1. Why one: the memory peak is the logits and their
    gradient, [batch, seq, vocab] floats several times over (Gemma-3-270m, 262k vocabulary, 8 x 512 tokens:
    13.5 GiB peak RSS at 4 sequences, 5.2 GiB at 1), and the sums do not depend on it: a token's gradient
    depends only on its own sequence, so any batching gives the same Grams and Fishers up to float rounding."""
    stats = CompressStats()
    hooks = _Hooks(adapter, stats)
    device = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    nll_sum, count = 0.0, 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad(), _grad_from_embeddings(adapter):
            for ids, mask in tqdm(calib.batches(batch_size), desc=desc, disable=not progress, leave=False):
                ids, mask = ids.to(device), mask.to(device)
                hooks.mask = mask
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                nll, n = token_nll(logits, ids, mask)
                if not torch.isfinite(nll):
                    raise ActivationOverflowError("the calibration loss is not finite; use --dtype float32")
                nll.backward()
                nll_sum += float(nll.detach())
                count += n
    finally:
        hooks.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return _summed(stats, total(torch.tensor([nll_sum, count], dtype=torch.float64)), total)


def _summed(stats: CompressStats, loss: torch.Tensor, total: Callable[[torch.Tensor], torch.Tensor]) -> CompressStats:
    """`stats` with every sum replaced by `total` of it; sub-layers in sorted order, the same on every rank,
    so that collective calls pair up."""
    keys = sorted(stats.layers)
    for key in keys:
        st = stats.layers[key]
        st.gram, st.fisher = total(st.gram), total(st.fisher)
    tokens = total(torch.tensor([stats.layers[k].tokens for k in keys], dtype=torch.float64))
    for key, n in zip(keys, tokens.tolist()):
        stats.layers[key].tokens = int(n)
    stats.loss, stats.tokens = float(loss[0]) / max(float(loss[1]), 1.0), int(loss[1])
    return stats
