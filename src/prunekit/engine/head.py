"""Observers at the top of the decoder stack: the next-token loss of the last layer's output (final norm and
LM head through `adapter.logits`, on the source's `head`), and its gradient, which `LayerRunner.backward`
carries down the layers; and `HeldOutCheck`, the one held-out check (loss or KL from the dense model, re-run
from the layer that changed) that every search, probe and repair uses.

Both take one sequence of a batch at a time through the head: its logits, [seq, vocab] floats several times
over (the log-softmax, a float copy, a gradient), are the memory peak of a pass (Gemma-3-270m's 262k
vocabulary: 0.5 GiB per 512-token sequence each), and the sums do not depend on how sequences are grouped.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from prunekit.data import CalibrationData
from prunekit.engine.runner import LayerRunner, Observer
from prunekit.engine.sources import LayerSource
from prunekit.errors import ActivationOverflowError
from prunekit.losses import KL_TOPK, Reference, means, token_kl, token_nll, top_logits


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


class HeldOutCheck:
    """The one held-out check of a model being edited: over `data`, the mean causal-LM loss or (`kl`) the top-K
    KL(dense || model) from the dense model's next-token distributions, taken when the check is built (so
    build it before any edit). With every layer's input remembered (`remember_inputs`), an edit at layer j is
    checked by re-running layers j.. only. `total` sums the observers' sums over processes (data parallel).
    `passes` counts the layers run, in passes of the whole stack."""

    def __init__(self, source: LayerSource, data: CalibrationData, *, batch_size: int, kl: bool = False,
                 total: Callable[[torch.Tensor], torch.Tensor] | None = None, work_dir: Path | None = None,
                 remember_inputs: bool = True, state_budget_bytes: int = 2 << 30):
        self.source = source
        self.total = total or (lambda sums: sums)
        self.runner = LayerRunner(source, data, batch_size=batch_size, work_dir=work_dir,
                                  remember_inputs=remember_inputs, state_budget_bytes=state_budget_bytes,
                                  progress=False)
        self.reference: Reference | None = None
        self.passes = 0.0
        if kl:
            obs = LossObserver(source, self.runner.batches, keep_topk=KL_TOPK)
            self._run(obs, 0)
            self.reference = [obs.kept[b] for b in range(len(self.runner.batches))]

    @property
    def kl(self) -> bool:
        return self.reference is not None

    def measure(self, start: int = 0) -> tuple[float, float | None]:
        """(mean loss, KL from the dense model or None) of the model as it is now; layers below `start` must not
        have changed since they last ran."""
        obs = LossObserver(self.source, self.runner.batches, reference=self.reference)
        self._run(obs, start)
        return means(self.total(obs.sums), self.kl)

    def value(self, start: int = 0) -> float:
        """The criterion: the KL with `kl`, else the loss."""
        loss, kl = self.measure(start)
        return loss if kl is None else kl

    def dense_value(self) -> float:
        """The criterion of the model as built (the dense one): its KL from itself is 0, no pass needed."""
        return 0.0 if self.kl else self.value(0)

    def invalidate_from(self, layer: int) -> None:
        """Forget the states from `layer` up (the model changed there)."""
        self.runner.invalidate_from(layer)

    def _run(self, obs: LossObserver, start: int) -> None:
        n = self.source.adapter.num_layers
        begin = self.runner.run([obs], start_layer=start)
        self.passes += (n - begin) / n
