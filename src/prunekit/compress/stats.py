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
dtype, then accumulated), and padding tokens are excluded. Grams that would not fit in memory together are
taken in groups, one forward pass each, and kept on disk (`collect_stats`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
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
    gram: torch.Tensor | None  # [in, in] float64; None while it lies in `gram_file` (`CompressStats.layer`)
    fisher: torch.Tensor  # [d, d] float64
    tokens: int = 0
    gram_file: Path | None = None


@dataclass
class CompressStats:
    layers: dict[Sublayer, SublayerStats] = field(default_factory=dict)
    loss: float = 0.0  # mean calibration NLL of the model the statistics were taken on
    tokens: int = 0
    gram_groups: int = 1  # passes the Grams took (more than one when they were spilled to disk)

    def layer(self, key: Sublayer) -> SublayerStats:
        """`layers[key]` with its Gram in memory: read from disk for this one use when it was spilled."""
        st = self.layers[key]
        if st.gram is not None:
            return st
        assert st.gram_file is not None
        return SublayerStats(torch.load(st.gram_file, weights_only=True), st.fisher, st.tokens)

    def release(self) -> None:
        """Forget every sum and delete the spilled Grams (a later round's statistics replace these)."""
        for st in self.layers.values():
            if st.gram_file is not None:
                st.gram_file.unlink(missing_ok=True)
        self.layers.clear()


def _outer(rows: torch.Tensor) -> torch.Tensor:
    return (rows.T @ rows).to(torch.float64)


def output_projections(adapter: ModelAdapter) -> dict[Sublayer, nn.Linear]:
    """The output projection (o_proj / down_proj) of every present sub-layer, in sorted key order."""
    out: dict[Sublayer, nn.Linear] = {}
    for i, layer in enumerate(adapter.layers()):
        for part, present in (("attn", adapter.has_attention(layer)), ("mlp", adapter.has_mlp(layer))):
            if present:
                out[(i, part)] = adapter.output_projection(layer, part)
    return out


def gram_groups(widths: dict[Sublayer, int], budget_bytes: int | None) -> list[list[Sublayer]]:
    """Sub-layers (sorted) in consecutive groups whose float64 Grams ([in, in] for `widths[s]` = in) fit in
    `budget_bytes` together (a bigger one alone); None: one group."""
    groups: list[list[Sublayer]] = [[]]
    used = 0
    for key in sorted(widths):
        size = 8 * widths[key] ** 2
        if budget_bytes is not None and groups[-1] and used + size > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += size
    return groups


class _Hooks:
    """Forward hooks on output projections: fold the input Gram in at once (for the sub-layers in `grams`)
    and, when `fishers`, register a tensor hook for the output's gradient (folded in during backward)."""

    def __init__(self, projections: dict[Sublayer, nn.Linear], stats: CompressStats, grams: list[Sublayer],
                 fishers: bool):
        self.stats = stats
        self.grams = set(grams)
        self.fishers = fishers
        self.mask: torch.Tensor | None = None
        self.handles: list[Any] = []
        for key, proj in projections.items():
            if key in self.grams:
                stats.layers[key].gram = torch.zeros(proj.in_features, proj.in_features, dtype=torch.float64)
            if key in self.grams or fishers:
                self.handles.append(proj.register_forward_hook(self._hook(key)))

    def _hook(self, key: Sublayer) -> Any:
        def forward(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            st = self.stats.layers[key]
            mask = self.mask
            if key in self.grams:
                rows = masked_rows(args[0].detach(), mask).to(args[0].dtype)
                st.gram += _outer(rows).cpu()  # type: ignore[operator]
                st.tokens += int(rows.shape[0])

            def backward(grad: torch.Tensor) -> None:
                st.fisher += _outer(masked_rows(grad, mask).to(grad.dtype)).cpu()

            if self.fishers and out.requires_grad:
                out.register_hook(backward)
        return forward

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextmanager
def _grad_from_embeddings(adapter: ModelAdapter, enabled: bool = True) -> Iterator[None]:
    """Gradients flow from the embedding output on, so no weight needs `requires_grad` (nothing is trained,
    and no weight gradient is ever stored)."""
    if not enabled:
        yield
        return
    handle = adapter.embed().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


def _same(values: torch.Tensor) -> torch.Tensor:
    return values


def collect_stats(model: nn.Module, adapter: ModelAdapter, calib: CalibrationData, *, batch_size: int = 1,
                  progress: bool = True, desc: str = "compress statistics",
                  total: Callable[[torch.Tensor], torch.Tensor] = _same, gram_budget_bytes: int | None = None,
                  spill_dir: Path | None = None) -> CompressStats:
    """Gram and Fisher of every present sub-layer of `model` (see the module docstring). `total` turns this
    process's float64 sums into the sums over every process (under torchrun each rank passes its own share
    of the batches and an all-reduce); in one process it is the identity.

    `batch_size`: sequences per forward+backward, default 1. Why one: the memory peak is the logits and their
    gradient, [batch, seq, vocab] floats several times over (Gemma-3-270m, 262k vocabulary, 8 x 512 tokens:
    13.5 GiB peak RSS at 4 sequences, 5.2 GiB at 1), and the sums do not depend on it: a token's gradient
    depends only on its own sequence, so any batching gives the same Grams and Fishers up to float rounding.

    `gram_budget_bytes`: when all the Grams together would not fit in it (Qwen2.5-1.5B: 18 GiB), they are
    taken in groups that do (`gram_groups`), one extra forward pass per further group, and each group is
    written to `spill_dir` once summed, so memory holds one group at a time; `CompressStats.layer` reads a
    spilled Gram back when it is used. The Fishers ([d, d], small) are all taken in the first pass, with
    its backward. The same budget must be given on every rank (the groups decide the collective calls)."""
    projections = output_projections(adapter)
    stats = CompressStats({key: SublayerStats(None, torch.zeros(p.out_features, p.out_features,
                                                                dtype=torch.float64))
                           for key, p in projections.items()})
    groups = gram_groups({k: p.in_features for k, p in projections.items()}, gram_budget_bytes)
    if len(groups) > 1 and spill_dir is None:
        raise ValueError("the Grams need more than gram_budget_bytes: give a spill_dir to write them to")
    spill = spill_dir if len(groups) > 1 else None
    stats.gram_groups = len(groups)
    loss = _pass(model, adapter, calib, stats, projections, groups[0], True, batch_size, progress, desc)
    _total_grams(stats, groups[0], total, spill)
    for g, group in enumerate(groups[1:], start=2):
        _pass(model, adapter, calib, stats, projections, group, False, batch_size, progress,
              f"{desc}, Grams {g}/{len(groups)}")
        _total_grams(stats, group, total, spill)
    return _summed(stats, total(loss), total)


def _pass(model: nn.Module, adapter: ModelAdapter, calib: CalibrationData, stats: CompressStats,
          projections: dict[Sublayer, nn.Linear], grams: list[Sublayer], backward: bool, batch_size: int,
          progress: bool, desc: str) -> torch.Tensor:
    """One pass over `calib`: the Grams of `grams`, and with `backward` the Fishers of every sub-layer.
    Returns this process's [summed NLL, tokens] (zeros without `backward`)."""
    hooks = _Hooks(projections, stats, grams, backward)
    device = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    nll_sum, count = 0.0, 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.set_grad_enabled(backward), _grad_from_embeddings(adapter, backward):
            for ids, mask in tqdm(calib.batches(batch_size), desc=desc, disable=not progress, leave=False):
                ids, mask = ids.to(device), mask.to(device)
                hooks.mask = mask
                if not backward:  # the Grams only need the decoder layers: no LM head over the vocabulary
                    adapter.base_model()(input_ids=ids, attention_mask=mask, use_cache=False)
                    continue
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
    return torch.tensor([nll_sum, count], dtype=torch.float64)


def _total_grams(stats: CompressStats, group: list[Sublayer], total: Callable[[torch.Tensor], torch.Tensor],
                 spill: Path | None) -> None:
    """`group`'s Grams summed over processes (in sorted order, the same on every rank), and written to
    `spill` when given (then dropped from memory)."""
    for key in sorted(group):
        st = stats.layers[key]
        assert st.gram is not None
        st.gram = total(st.gram)
        if spill is not None:
            st.gram_file = spill / f"gram-{key[0]:05d}-{key[1]}.pt"
            torch.save(st.gram, st.gram_file)
            st.gram = None


def _summed(stats: CompressStats, loss: torch.Tensor, total: Callable[[torch.Tensor], torch.Tensor]) -> CompressStats:
    """`stats` with the Fishers and token counts replaced by `total` of them (the Grams are summed per
    group); sub-layers in sorted order, the same on every rank, so that collective calls pair up."""
    keys = sorted(stats.layers)
    for key in keys:
        stats.layers[key].fisher = total(stats.layers[key].fisher)
    tokens = total(torch.tensor([stats.layers[k].tokens for k in keys], dtype=torch.float64))
    for key, n in zip(keys, tokens.tolist()):
        stats.layers[key].tokens = int(n)
    stats.loss, stats.tokens = float(loss[0]) / max(float(loss[1]), 1.0), int(loss[1])
    return stats
