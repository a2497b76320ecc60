"""Recovery ("healing") after pruning: the training loop (`train`), the distillation loss (`distill`), LoRA
through peft (`lora`) and the training text, teacher-generated text included (`sources`)."""

from prunekit.recovery.distill import check_teacher, kl_distill_loss
from prunekit.recovery.lora import add_lora, lora_targets, merge_lora
from prunekit.recovery.train import DEFAULT_LR, TEACHER_ALPHA, _lr_factor, check_hidden, check_settings, recover

__all__ = ["DEFAULT_LR", "TEACHER_ALPHA", "_lr_factor", "add_lora", "check_hidden", "check_settings", "check_teacher",
           "kl_distill_loss", "lora_targets", "merge_lora", "recover"]
