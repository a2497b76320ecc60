"""Recovery fine-tuning ("healing"): a short causal-LM training run that lets a pruned model adapt to what
was removed.

Pruning changes what later layers receive; a few hundred steps of ordinary next-token training on general
text recover part of the loss (LLM-Pruner, Sheared-LLaMA and Minitron all finish with such a phase). This
module trains every parameter the pruned model still has with AdamW; the structure never changes (removed
heads, channels and sub-layers stay removed, a heterogeneous model stays heterogeneous), so the result is
saved and loaded exactly like the pruned checkpoint it came from.

Data. `CalibrationData` windows (`data.calibration_data`), i.e. the FIRST half of a text's token stream;
perplexity is measured on the second half, so training never sees evaluation tokens. Padding (mask 0) is
excluded from the loss.

Schedule. Linear warm-up over `warmup` of the steps, then cosine decay to zero; gradients clipped to
`max_grad_norm`; the batches visit the samples in a seeded random order, epoch after epoch, so a run is
reproducible (same seed, same data, same losses on the same machine).

Memory. Full fine-tuning holds the weights, their gradients and AdamW's two moments: about 4x the model in
the training dtype (float32 recommended), plus activations. That suits the small and mid-size models this
project runs on; parameter-efficient adapters (LoRA) for 7B+ models are not provided.

Use it alone (`prunekit heal`), or between the shots of iterative width pruning:
``width_prune(..., between_shots=lambda model, shot: recover(model, data, steps=20))``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.data import CalibrationData
from prunekit.errors import RecoveryError

METHOD = "full fine-tuning, AdamW, causal LM loss"


def _lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    done = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * done))


def check_settings(*, steps: int, lr: float, batch_size: int, warmup: float) -> None:
    """`RecoveryError` for settings no model could train with."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise RecoveryError(f"steps must be a positive integer, got {steps!r}")
    if not lr >= 0 or not math.isfinite(lr):
        raise RecoveryError(f"the learning rate must be a finite number >= 0, got {lr}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RecoveryError(f"batch size must be a positive integer, got {batch_size!r}")
    if not 0 <= warmup < 1:
        raise RecoveryError(f"warmup must be a fraction of the steps in [0, 1), got {warmup}")


def recover(model: nn.Module, data: CalibrationData, *, steps: int, lr: float = 5e-5, batch_size: int = 4,
            warmup: float = 0.1, weight_decay: float = 0.0, max_grad_norm: float = 1.0, seed: int = 0,
            progress: bool = True) -> dict[str, Any]:
    """Train `model` in place for `steps` optimizer steps on `data`; returns the record that goes into the
    plan (`PruningPlan.recovery`): settings, data provenance and the loss of every step. The model is left
    in eval mode with no gradients held."""
    check_settings(steps=steps, lr=lr, batch_size=batch_size, warmup=warmup)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecoveryError("the model has no trainable parameters")
    device = params[0].device
    n = len(data.input_ids)
    warmup_steps = max(1, round(warmup * steps)) if warmup > 0 else 0
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup_steps))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    seen = 0
    model.train()
    try:
        bar = tqdm(range(steps), desc="recovery", disable=not progress, leave=False)
        for _ in bar:
            idx: list[int] = []
            while len(idx) < min(batch_size, n):
                if not order:
                    order = torch.randperm(n, generator=gen).tolist()
                idx.append(order.pop())
            ids = data.input_ids[idx].to(device)
            mask = data.attention_mask[idx].to(device)
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            if not torch.isfinite(loss):
                raise RecoveryError(f"the training loss became {loss.item()} at step {len(losses) + 1}; lower "
                                    "the learning rate (or train in float32)")
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            seen += int(mask.sum())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        opt.zero_grad(set_to_none=True)
        model.eval()
    tail = losses[-max(1, steps // 10):]
    return {
        "method": METHOD,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "warmup_steps": warmup_steps,
        "schedule": "linear warm-up, cosine decay to 0",
        "weight_decay": weight_decay,
        "max_grad_norm": max_grad_norm,
        "seed": seed,
        "data": data.describe(),
        "tokens_seen": seen,
        "loss_first": losses[0],
        "loss_last_10pct_mean": sum(tail) / len(tail),
        "losses": losses,
        "seconds": round(time.perf_counter() - t0, 2),
    }
