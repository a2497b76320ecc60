"""Observers at the top of the decoder stack: the next-token loss of the last layer's output (final norm and
LM head through `adapter.logits`, on the source's `head`), and its gradient, which `LayerRunner.backward`
carries down the layers.

Both take one sequence of a batch at a time through the head: its logits, [seq, vocab] floats several times
over (the log-softmax, a float copy, a gradient), are the memory peak of a pass (Gemma-3-270m's 262k
vocabulary: 0.5 GiB per 512-token sequence each), and the sums do not depend on how sequences are grouped.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from prunekit.engine.runner import Observer
from prunekit.engine.sources import LayerSource
from prunekit.errors import ActivationOverflowError
from prunekit.losses import Reference, token_kl, token_nll, top_logits


class _Head(Observer):
    """Holds the source's head (final norm, LM head) while the last layer runs."""

    def __init__(self, source: LayerSource, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.source = source
        self.adapter = source.adapter
        self.batches = batches
        self.last = source.adapter.num_layers - 1
        self._head = ExitStack()

    def begin_layer(self, i: int, layer: nn.Module) -> None:
        if i == self.last:
            self._head.enter_context(self.source.head())

    def end_layer(self, i: int, layer: nn.Module) -> None:
        if i == self.last:
            self._head.close()

    def rows(self, b: int, h_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(hidden states, token ids, mask) of each sequence of batch `b`, one-row batches."""
        ids, mask = self.batches[b]
        return [(h_out[j:j + 1], ids[j:j + 1], mask[j:j + 1]) for j in range(h_out.shape[0])]


class LossObserver(_Head):
    """float64 sums [NLL, tokens, KL, KL tokens] over the real (unpadded) next-token positions: the causal-LM
    loss and, given `reference` (another model's `top_logits` per batch), the top-K KL(reference || model).
    `keep_topk` records this pass's own top-K logits per batch (`kept`): the reference, on a dense pass."""

    def __init__(self, source: LayerSource, batches: list[tuple[torch.Tensor, torch.Tensor]], *,
                 reference: Reference | None = None, keep_topk: int = 0):
        super().__init__(source, batches)
        self.reference = reference
        self.keep_topk = keep_topk
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sums = torch.zeros(4, dtype=torch.float64)

    def observe(self, i: int, b: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                mask: torch.Tensor | None) -> None:
        if i != self.last:
            return
        tops = []
        for j, (h, ids, m) in enumerate(self.rows(b, h_out)):
            logits = self.adapter.logits(h)
            nll, n = token_nll(logits, ids, m)
            self.sums[0] += float(nll)
            self.sums[1] += n
            if self.reference is not None:
                values, index = self.reference[b]
                kl, real = token_kl(logits, (values[j:j + 1], index[j:j + 1]), m)
                self.sums[2] += float(kl)
                self.sums[3] += real
            if self.keep_topk:
                tops.append(top_logits(logits, self.keep_topk))
        if tops:
            self.kept[b] = (torch.cat([v for v, _ in tops]), torch.cat([k for _, k in tops]))

    @property
    def loss(self) -> float:
        """The mean KL from the reference when there is one, else the mean NLL."""
        k = 2 if self.reference is not None else 0
        return float(self.sums[k]) / max(float(self.sums[k + 1]), 1.0)


class LossGradient(_Head):
    """The summed causal-LM loss (`sums`: [NLL, tokens]) and, per batch, its gradient with respect to the last
    layer's output (`grads`): where `LayerRunner.backward` starts. No weight gets a gradient."""

    def __init__(self, source: LayerSource, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(source, batches)
        self.grads: dict[int, torch.Tensor] = {}
        self.sums = torch.zeros(2, dtype=torch.float64)

    def observe(self, i: int, b: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                mask: torch.Tensor | None) -> None:
        if i != self.last:
            return
        grads = []
        for h, ids, m in self.rows(b, h_out):
            h = h.detach().requires_grad_(True)
            with torch.enable_grad():
                nll, n = token_nll(self.adapter.logits(h), ids, m)
                if not torch.isfinite(nll):
                    raise ActivationOverflowError("the calibration loss is not finite; use --dtype float32")
                (g,) = torch.autograd.grad(nll, h)
            grads.append(g)
            self.sums[0] += float(nll.detach())
            self.sums[1] += n
        self.grads[b] = torch.cat(grads)
