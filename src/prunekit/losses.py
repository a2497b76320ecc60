"""The masked next-token loss and the KL divergence to a reference model's next-token distributions, written
once: what loss-guided dropping, linear repair and `compress` compare candidates by, on calibration tokens
(padding excluded), and what distillation trains on.

The KL is KL(teacher || student) between next-token distributions softened by a temperature T, scaled by
T^2 so that its gradient has the same size for any T (Hinton et al., 2015), averaged over the real
(unpadded) positions. `topk` keeps only the teacher's K largest logits per position and compares both
distributions renormalised over those K token ids: a student equal to its teacher still has loss 0, and the
reference costs K values per position to keep instead of the vocabulary."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.data import CalibrationData
from prunekit.errors import PlanError


def loss_perplexity(loss: float) -> float:
    """exp(mean loss), capped so that a diverged candidate's loss reports a huge perplexity, not an overflow."""
    return math.exp(min(loss, 700.0))


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


Reference = list[tuple[torch.Tensor, torch.Tensor]]
KL_TOPK = 256  # a reference model's most likely tokens kept per position for KL criteria: 3 KB per token


def top_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values in float32, token ids) of the K largest logits at every position: a KL reference."""
    return logits.float().topk(min(k, logits.shape[-1]), dim=-1)


def token_kl(logits: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor],
             mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """`token_nll`'s twin for the KL criteria: (top-K KL(reference || logits) summed over the real positions,
    positions counted), `reference` being `top_logits` of the reference model on the same batch."""
    m = torch.ones(logits.shape[:2], dtype=torch.long, device=logits.device) if mask is None else mask.to(logits.device)
    n = int(m.sum())
    return kl_topk_loss(logits, *reference, m) * n, n


@torch.no_grad()
def topk_reference(model: nn.Module, calib: CalibrationData, batch_size: int, k: int) -> Reference:
    """`model`'s K largest logits (values, token ids) at every position of `calib`, batch by batch (a
    teacher's, cached for distillation)."""
    device = next(model.parameters()).device
    return [top_logits(model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits, k)
            for ids, mask in calib.batches(batch_size)]


def means(sums: torch.Tensor, with_kl: bool) -> tuple[float, float | None]:
    """(mean NLL, mean KL or None) from four sums [NLL, tokens, KL, KL tokens] (`engine.head.LossObserver`'s)."""
    loss = float(sums[0]) / max(float(sums[1]), 1.0)
    return loss, (float(sums[2]) / max(float(sums[3]), 1.0) if with_kl else None)


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


def kl_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
                    temperature: float = 1.0, topk: int | None = None) -> torch.Tensor:
    """Mean over positions with `mask == 1` of T^2 * KL(p_teacher/T || p_student/T); logits [B, T, V]."""
    if topk is not None and topk < teacher_logits.shape[-1]:
        return kl_topk_loss(student_logits, *top_logits(teacher_logits, topk), mask, temperature=temperature)
    return _kl(student_logits.float() / temperature, teacher_logits.float() / temperature, mask) * temperature ** 2


def kl_topk_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                 mask: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """`kl_distill_loss` from the teacher's K largest logits only (`values`, `indices` [B, T, K], as
    `Tensor.topk` gives them, e.g. read back from a `TeacherLogitsCache`): both distributions renormalised
    over those K token ids."""
    s = student_logits.float().gather(-1, teacher_indices.long()) / temperature
    return _kl(s, teacher_values.float() / temperature, mask) * temperature ** 2


def _kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(t, dim=-1)
    log_q = F.log_softmax(s, dim=-1)
    # p * (log p - log q), summed over the vocabulary: 0 exactly where the distributions are equal.
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


def hidden_match_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                      mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers and real positions of ||h_s - h_t||^2 / ||h_t||^2 between the residual streams after
    each layer (`output_hidden_states`, the embeddings excluded): relative, because the stream's norm grows
    layer by layer and every layer should weigh alike. 0 exactly where the streams are equal."""
    if len(student) != len(teacher):
        raise PlanError(f"the student has {len(student) - 1} layers, the teacher {len(teacher) - 1}: hidden "
                        "states can only be matched layer for layer")
    m = mask.to(torch.float32)
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student[1:], teacher[1:], strict=True):
        t = t.float()
        err = (s.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)
        total = total + (err * m).sum() / m.sum().clamp_min(1)
    return total / max(1, len(student) - 1)
