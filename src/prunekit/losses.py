"""The masked next-token loss, written once: what loss-guided dropping, linear repair and `compress` compare
candidates by, on calibration tokens (padding excluded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.data import CalibrationData
from prunekit.errors import PlanError


def token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(summed next-token NLL as a float64 scalar tensor, tokens counted) of [batch, seq, vocab] `logits`
    for `ids`, skipping positions whose target is padding. The sum keeps the graph (compress takes its
    gradient)."""
    shifted = logits[:, :-1].float()
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), ids[:, 1:].reshape(-1).to(shifted.device),
                          reduction="none")
    if mask is None:
        return nll.double().sum(), int(nll.numel())
    keep = mask[:, 1:].reshape(-1).to(nll.device) != 0
    return nll[keep].double().sum(), int(keep.sum())


@torch.no_grad()
def mean_loss(model: nn.Module, calib: CalibrationData, batch_size: int) -> float:
    """Mean next-token NLL of `model` over `calib`."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for ids, mask in calib.batches(batch_size):
        ids, mask = ids.to(device), mask.to(device)
        nll, n = token_nll(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
        total += float(nll)
        count += n
    return total / max(count, 1)


def split_check(calib: CalibrationData, what: str) -> tuple[CalibrationData, CalibrationData]:
    """(fit, check): the last quarter of the calibration samples (at least one) is held out to check what was
    fitted or chosen on the rest."""
    n = len(calib.input_ids)
    if n < 4:
        raise PlanError(f"{what} needs at least 4 calibration samples (3 to fit, 1 to check), got {n}")
    k = n - max(1, n // 4)
    part = [CalibrationData(calib.input_ids[a:b], calib.attention_mask[a:b], calib.source, calib.sha256)
            for a, b in ((0, k), (k, n))]
    return part[0], part[1]
