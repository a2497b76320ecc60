"""Knowledge distillation loss (pure math) and the teacher/student compatibility check.

The loss is KL(teacher || student) between next-token distributions softened by a temperature T, scaled by
T^2 so that its gradient has the same size for any T (Hinton et al., 2015), averaged over the real
(unpadded) positions. The teacher's logits exist for ONE batch at a time (the caller runs the teacher on
the same batch in the same step), in float32 over the full vocabulary. `topk` keeps only the teacher's K
largest logits per position and compares both distributions renormalised over those K token ids: the
softmaxes and the KL then take K values per position instead of the vocabulary, and a student equal to its
teacher still has loss 0. The student's mass outside the teacher's top K is not constrained by that term;
mixing in some causal-LM loss (`alpha`) covers it. The same top-K loss is computed from logits cached on
disk (`teacher_cache.py`) when the teacher is run before the student instead of beside it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from prunekit.errors import RecoveryError


def kl_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
                    temperature: float = 1.0, topk: int | None = None) -> torch.Tensor:
    """Mean over positions with `mask == 1` of T^2 * KL(p_teacher/T || p_student/T); logits [B, T, V]."""
    if topk is not None and topk < teacher_logits.shape[-1]:
        values, indices = teacher_logits.float().topk(topk, dim=-1)
        return kl_topk_loss(student_logits, values, indices, mask, temperature=temperature)
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


def vocab_size(model: Any) -> int:
    """Rows of the output embedding: what the logits' last dimension will be."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_teacher(student: Any, teacher: Any, student_tok: Any = None, teacher_tok: Any = None) -> None:
    """`RecoveryError` when the teacher's next-token distributions are not over the student's vocabulary:
    different logit sizes, or tokenizers that map text or special tokens to different ids."""
    sv, tv = vocab_size(student), vocab_size(teacher)
    if sv != tv:
        raise RecoveryError(f"the teacher's vocabulary has {tv} tokens but the student's has {sv}; "
                            "distillation needs the same tokenizer")
    if student_tok is not None and teacher_tok is not None:
        check_tokenizers(student_tok, teacher_tok)


def check_tokenizers(student_tok: Any, teacher_tok: Any) -> None:
    """`RecoveryError` when two tokenizers map text or special tokens to different ids."""
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise RecoveryError("the teacher's tokenizer maps tokens to different ids than the student's; "
                            "distillation needs the same tokenizer")
    specials = [(getattr(student_tok, n, None), getattr(teacher_tok, n, None))
                for n in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")]
    if any(a != b for a, b in specials):
        raise RecoveryError("the teacher's special tokens (bos/eos/pad/unk) differ from the student's; "
                            "distillation needs the same tokenizer")
