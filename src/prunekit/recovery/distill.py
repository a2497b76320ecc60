"""Knowledge distillation: the teacher/student compatibility check. The loss (pure math) is
`prunekit.losses.kl_distill_loss` / `kl_topk_loss`, shared with the KL criterion of loss-guided dropping.

The teacher's logits exist for ONE batch at a time (the caller runs the teacher on the same batch in the
same step), in float32 over the full vocabulary; with `topk` both distributions are compared over the
teacher's K most likely tokens, and the student's mass outside them is left to the causal-LM term
(`alpha`). The same top-K loss is computed from logits cached on disk (`teacher_cache.py`) when the teacher
is run before the student instead of beside it.
"""
from __future__ import annotations

from typing import Any

from prunekit.errors import RecoveryError
from prunekit.losses import kl_distill_loss, kl_topk_loss

__all__ = ["check_teacher", "check_tokenizers", "kl_distill_loss", "kl_topk_loss", "vocab_size"]


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
