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

Loss. Without a teacher: the causal-LM loss (next-token cross-entropy). With a teacher (normally the dense
model the student was pruned from): `alpha * CE + (1 - alpha) * T^2 KL(teacher || student)` at temperature T
(`distill.kl_distill_loss`), the teacher in eval mode under no_grad, run on the same batch in the same step,
so its logits exist for one batch at a time; alpha defaults to `TEACHER_ALPHA` (0.5). When teacher and
student do not fit together, the teacher runs first and its top-K logits are read back from disk
(`teacher_cache.py`).

Memory. Full fine-tuning holds the weights, their gradients and AdamW's two moments: about 4x the model in
the training dtype (float32 recommended), plus activations. `lora=R` trains rank-R LoRA matrices on the
attention and MLP projections instead (`lora.py`, through peft) and merges them into the weights at the end,
so the result has exactly the structure and tensor names it started with.

Long runs. With `state_dir` and `save_every`, the loop saves resumable state every `save_every` steps and a
run started again with the same settings continues from it to the same result (`state.py`).

Use it alone (`prunekit heal`), or between the shots of iterative width pruning:
``width_prune(..., between_shots=lambda model, shot: recover(model, data, steps=20))``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.data import CalibrationData
from prunekit.errors import RecoveryError
from prunekit.faults import pause_point
from prunekit.losses import hidden_match_loss
from prunekit.recovery.distill import check_teacher, kl_distill_loss, kl_topk_loss, vocab_size
from prunekit.recovery.lora import add_lora, check_rank, merge_lora
from prunekit.recovery.state import capture, load_state, restore, run_key, save_state
from prunekit.recovery.teacher_cache import TeacherLogitsCache


def _lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based): the closed form of
    `lr_schedule`, which the tests hold it to."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    done = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * done))


def lr_schedule(opt: torch.optim.Optimizer, steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's own schedulers: linear warm-up from peak/warmup_steps to the peak over `warmup_steps` steps,
    then cosine decay to 0 over the rest."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    if warmup_steps == 0:
        return CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=0.0)
    warm = LinearLR(opt, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=max(1, warmup_steps - 1))
    cosine = CosineAnnealingLR(opt, T_max=max(1, steps - warmup_steps), eta_min=0.0)
    return SequentialLR(opt, [warm, cosine], milestones=[warmup_steps])


def check_settings(*, steps: int, lr: float, batch_size: int, warmup: float, alpha: float | None = None,
                   temperature: float = 1.0, teacher_topk: int | None = None, lora: int | None = None,
                   save_every: int = 0, hidden_weight: float = 0.0) -> None:
    """`RecoveryError` for settings no model could train with."""
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
        raise RecoveryError(f"save-every must be a number of steps >= 0 (0: never), got {save_every!r}")
    if alpha is not None and not 0 <= alpha <= 1:
        raise RecoveryError(f"alpha (the weight of the causal-LM loss) must be in [0, 1], got {alpha}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise RecoveryError(f"the distillation temperature must be a finite number > 0, got {temperature}")
    if teacher_topk is not None and (isinstance(teacher_topk, bool) or not isinstance(teacher_topk, int)
                                     or teacher_topk < 1):
        raise RecoveryError(f"teacher top-K must be a positive integer, got {teacher_topk!r}")
    if not hidden_weight >= 0 or not math.isfinite(hidden_weight):
        raise RecoveryError(f"the hidden-state loss weight must be a finite number >= 0, got {hidden_weight}")
    check_rank(lora)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise RecoveryError(f"steps must be a positive integer, got {steps!r}")
    if not lr >= 0 or not math.isfinite(lr):
        raise RecoveryError(f"the learning rate must be a finite number >= 0, got {lr}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RecoveryError(f"batch size must be a positive integer, got {batch_size!r}")
    if not 0 <= warmup < 1:
        raise RecoveryError(f"warmup must be a fraction of the steps in [0, 1), got {warmup}")


def method_name(teacher: bool, alpha: float, lora: int | None, hidden_weight: float = 0.0) -> str:
    what = f"LoRA r={lora} (merged)" if lora else "full fine-tuning"
    if not teacher:
        loss = "causal LM loss"
    elif alpha == 0:
        loss = "distillation (KL to the teacher)"
    else:
        loss = f"{alpha:g} x causal LM + {1 - alpha:g} x distillation"
    if hidden_weight:
        loss += f" + {hidden_weight:g} x hidden states"
    return f"{what}, AdamW, {loss}"


Teacher = nn.Module | TeacherLogitsCache

# A short run needs a rate high enough to move every weight in a few hundred steps; the causal-LM half keeps
# the student on real text where the teacher is unsure. Chosen on windows no run trains on (docs/decisions.md).
DEFAULT_LR = 2e-4
TEACHER_ALPHA = 0.5


def recover(model: nn.Module, data: CalibrationData, *, steps: int, lr: float = DEFAULT_LR, batch_size: int = 4,
            warmup: float = 0.1, weight_decay: float = 0.0, max_grad_norm: float = 1.0, seed: int = 0,
            teacher: Teacher | None = None, alpha: float | None = None, temperature: float = 1.0,
            teacher_topk: int | None = None, lora: int | None = None, lora_alpha: float | None = None,
            hidden_weight: float = 0.0, state_dir: str | Path | None = None, save_every: int = 0,
            progress: bool = True) -> dict[str, Any]:
    """Train `model` in place for `steps` optimizer steps on `data`; returns the record that goes into the
    plan (`PruningPlan.recovery`): settings, data provenance and the loss of every step. The model is left
    in eval mode with no gradients held (and, with `lora`, the LoRA updates merged into its weights).

    `teacher`: distil from it (same vocabulary required): a model run beside the student, or a
    `TeacherLogitsCache` of its top-K logits computed beforehand; `alpha`: weight of the causal-LM loss in
    the mix (default `TEACHER_ALPHA` with a teacher, 1 without); `temperature`, `teacher_topk`: see
    `distill.kl_distill_loss`; `hidden_weight`: adds that many times `losses.hidden_match_loss`, the
    relative error of the student's residual stream after every layer against the teacher's (a teacher
    model with as many layers is needed). `state_dir` + `save_every`: write resumable state there every
    `save_every` steps and continue from a state found there (`state.py`)."""
    check_settings(steps=steps, lr=lr, batch_size=batch_size, warmup=warmup, alpha=alpha, temperature=temperature,
                   teacher_topk=teacher_topk, lora=lora, save_every=save_every, hidden_weight=hidden_weight)
    r = _Recipe(steps=steps, lr=lr, batch_size=batch_size, warmup=warmup, weight_decay=weight_decay,
                max_grad_norm=max_grad_norm, seed=seed, alpha=_loss_mix(alpha, teacher), temperature=temperature,
                teacher_topk=teacher_topk, lora=lora, lora_alpha=lora_alpha, hidden_weight=hidden_weight)
    _check_teacher(model, teacher, data)
    if hidden_weight > 0:
        check_hidden(model, teacher)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    if not any(trainable.values()):
        raise RecoveryError("the model has no trainable parameters")
    folder = Path(state_dir) if state_dir is not None and save_every > 0 else None
    key = "" if folder is None else _state_key(model, r, data, teacher)
    run = _Run(add_lora(model, lora, alpha=lora_alpha) if lora else model, data, teacher, r)
    resumed_at = run.resume(folder, key)
    try:
        run.train(folder, key, save_every, progress)
    finally:
        run.end(model, trainable)
    return _record(r, teacher, data, run.log, resumed_at)


def _loss_mix(alpha: float | None, teacher: Teacher | None) -> float:
    """The causal-LM weight: `TEACHER_ALPHA` by default with a teacher, 1 (causal LM alone) without one."""
    if alpha is None:
        return TEACHER_ALPHA if teacher is not None else 1.0
    if teacher is None and alpha != 1.0:
        raise RecoveryError(f"alpha={alpha} mixes in a distillation loss, which needs a teacher")
    return alpha


class _Run:
    """One training run's moving parts: the trained parameters, AdamW, the schedule, the batch order's
    generator and `log` (step, what is left of the epoch's order, every step's losses, tokens seen, seconds),
    which together are exactly what a resumable state holds (`state.py`)."""

    def __init__(self, net: nn.Module, data: CalibrationData, teacher: Teacher | None, r: _Recipe) -> None:
        self.net, self.data, self.teacher, self.r = net, data, teacher, r
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=r.lr, weight_decay=r.weight_decay)
        self.sched = lr_schedule(self.opt, r.steps, r.warmup_steps)
        self.gen = torch.Generator().manual_seed(r.seed)
        self.log: dict[str, Any] = {"step": 0, "order": [], "losses": [], "ce_losses": [], "kl_losses": [],
                                    "hidden_losses": [], "seen": 0, "seconds": 0.0}

    def resume(self, folder: Path | None, key: str) -> int:
        """Continue from the state saved in `folder` for `key`, if any; the step it resumes at (0: fresh)."""
        saved = load_state(folder, key) if folder is not None else None
        if saved is not None:  # over the fresh defaults: a state saved before a record field existed still resumes
            self.log = {**self.log, **restore(saved, self.net, self.opt, self.sched, self.gen)}
        return self.log["step"]

    def train(self, folder: Path | None, key: str, save_every: int, progress: bool) -> None:
        """The remaining steps, saving resumable state every `save_every` steps into `folder` (if given)."""
        log, steps = self.log, self.r.steps
        t0 = time.perf_counter() - log["seconds"]
        self.net.train()
        bar = tqdm(range(log["step"], steps), desc="recovery", disable=not progress, leave=False,
                   initial=log["step"], total=steps)
        for _ in bar:
            self.step()
            log["seconds"] = time.perf_counter() - t0
            bar.set_postfix(loss=f"{log['losses'][-1]:.3f}", tok_s=f"{log['seen'] / max(log['seconds'], 1e-9):.0f}")
            if folder is not None and log["step"] % save_every == 0 and log["step"] < steps:
                save_state(folder, capture(key, self.net, self.opt, self.sched, self.gen, log))
                pause_point("training")

    def step(self) -> None:
        """One optimizer step on the next batch of the seeded order."""
        log, r = self.log, self.r
        idx = _next_rows(log["order"], len(self.data.input_ids), r.batch_size, self.gen)
        device = self.params[0].device
        ids = self.data.input_ids[idx].to(device)
        mask = self.data.attention_mask[idx].to(device)
        loss = _batch_loss(self.net, self.teacher, r, idx, ids, mask, log)
        if not torch.isfinite(loss):
            raise RecoveryError(f"the training loss became {loss.item()} at step {log['step'] + 1}; lower "
                                "the learning rate (or train in float32)")
        loss.backward()
        if r.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, r.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        log["losses"].append(float(loss.detach()))
        log["seen"] += int(mask.sum())
        log["step"] += 1

    def end(self, model: nn.Module, trainable: dict[str, bool]) -> None:
        """Whether the run finished or failed: no gradients held, LoRA merged into `model`'s weights, the
        parameters' `requires_grad` as they were, eval mode."""
        self.opt.zero_grad(set_to_none=True)
        if self.r.lora:
            merge_lora(self.net)  # the LoRA modules are swapped back for plain ones holding W + BA
            for name, p in model.named_parameters():
                p.requires_grad_(trainable.get(name, True))
        model.eval()


@dataclass(frozen=True)
class _Recipe:
    """`recover`'s settings after the defaults are resolved."""

    steps: int
    lr: float
    batch_size: int
    warmup: float
    weight_decay: float
    max_grad_norm: float
    seed: int
    alpha: float
    temperature: float
    teacher_topk: int | None
    lora: int | None
    lora_alpha: float | None
    hidden_weight: float

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup * self.steps)) if self.warmup > 0 else 0


def _state_key(model: nn.Module, r: _Recipe, data: CalibrationData, teacher: Teacher | None) -> str:
    """What a saved state must match to be resumed: the starting weights, the recipe, the data, the teacher."""
    return run_key(model, {
        "steps": r.steps, "lr": r.lr, "batch_size": r.batch_size, "warmup": r.warmup,
        "weight_decay": r.weight_decay, "max_grad_norm": r.max_grad_norm, "seed": r.seed, "alpha": r.alpha,
        "temperature": r.temperature, "teacher_topk": r.teacher_topk, "lora": r.lora, "lora_alpha": r.lora_alpha,
        "data": data.sha256, "teacher": _teacher_identity(teacher),
        # only when used, so that states saved before the option existed still resume
        **({"hidden_weight": r.hidden_weight} if r.hidden_weight else {})})


def _batch_loss(net: nn.Module, teacher: Teacher | None, r: _Recipe, idx: list[int], ids: torch.Tensor,
                mask: torch.Tensor, run: dict[str, Any]) -> torch.Tensor:
    """The training loss of one batch; its parts are appended to `run`'s per-step lists."""
    labels = ids.masked_fill(mask == 0, -100) if r.alpha > 0 else None
    out = net(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False,
              output_hidden_states=r.hidden_weight > 0)
    if teacher is None:
        return out.loss
    kd, hid = _distill_loss(teacher, idx, ids, mask, out, r.temperature, r.teacher_topk, r.hidden_weight > 0)
    loss = kd if r.alpha == 0 else r.alpha * out.loss + (1 - r.alpha) * kd
    run["kl_losses"].append(float(kd.detach()))
    if r.alpha > 0:
        run["ce_losses"].append(float(out.loss.detach()))
    if hid is not None:
        loss = loss + r.hidden_weight * hid
        run["hidden_losses"].append(float(hid.detach()))
    return loss


def _record(r: _Recipe, teacher: Teacher | None, data: CalibrationData, run: dict[str, Any],
            resumed_at: int) -> dict[str, Any]:
    losses = run["losses"]
    tail = losses[-max(1, r.steps // 10):]
    rec: dict[str, Any] = {
        "method": method_name(teacher is not None, r.alpha, r.lora, r.hidden_weight),
        "steps": r.steps,
        "lr": r.lr,
        "batch_size": r.batch_size,
        "warmup_steps": r.warmup_steps,
        "schedule": "linear warm-up, cosine decay to 0",
        "weight_decay": r.weight_decay,
        "max_grad_norm": r.max_grad_norm,
        "seed": r.seed,
        "loss": {"ce_weight": r.alpha, "kl_weight": 1 - r.alpha, "hidden_weight": r.hidden_weight,
                 "temperature": r.temperature if teacher else None,
                 "teacher_topk": (teacher.topk if isinstance(teacher, TeacherLogitsCache)
                                  else r.teacher_topk if teacher else None)},
        "lora": ({"rank": r.lora, "alpha": r.lora_alpha if r.lora_alpha is not None else 2 * r.lora,
                  "dropout": 0.0, "targets": "q/k/v/o and gate/up/down projections of the layers that have them",
                  "merged": True} if r.lora else None),
        "data": data.describe(),
        "tokens_seen": run["seen"],
        "loss_first": losses[0],
        "loss_last_10pct_mean": sum(tail) / len(tail),
        "losses": losses,
        "seconds": round(run["seconds"], 2),
    }
    if isinstance(teacher, TeacherLogitsCache):
        rec["teacher_logits"] = teacher.record
    if resumed_at:
        rec["resumed_at_step"] = resumed_at
    for part in ("kl_losses", "ce_losses", "hidden_losses"):
        if run[part]:
            rec[part] = run[part]
    return rec


def _check_teacher(model: nn.Module, teacher: Teacher | None, data: CalibrationData) -> None:
    if isinstance(teacher, nn.Module):
        check_teacher(model, teacher)
        teacher.eval()
    elif teacher is not None:
        if teacher.vocab != vocab_size(model):
            raise RecoveryError(f"the cached teacher logits are over {teacher.vocab} tokens but the student's "
                                f"vocabulary has {vocab_size(model)}; distillation needs the same tokenizer")
        if teacher.windows != len(data.input_ids):
            raise RecoveryError(f"the cached teacher logits cover {teacher.windows} windows, the training data "
                                f"has {len(data.input_ids)}")


def _next_rows(order: list[int], n: int, batch_size: int, gen: torch.Generator) -> list[int]:
    """The next batch's windows: a seeded random order, epoch after epoch (`order` is what is left of it)."""
    idx: list[int] = []
    while len(idx) < min(batch_size, n):
        if not order:
            order.extend(torch.randperm(n, generator=gen).tolist())
        idx.append(order.pop())
    return idx


def check_hidden(model: nn.Module, teacher: Teacher | None) -> None:
    """`RecoveryError` unless the hidden-state loss can pair `model`'s layers with `teacher`'s one for one."""
    if not isinstance(teacher, nn.Module):
        raise RecoveryError("the hidden-state loss needs the teacher model itself (not absent, not cached logits)")
    s, t = (getattr(m.config, "num_hidden_layers", None) for m in (model, teacher))
    if s != t:
        raise RecoveryError(f"the hidden-state loss matches layer for layer, but the student has {s} layers and "
                            f"the teacher {t} (block drops remove layers); use the logit loss alone")


def _distill_loss(teacher: Teacher, idx: list[int], ids: torch.Tensor, mask: torch.Tensor, student: Any,
                  temperature: float, topk: int | None, hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(KL to the teacher, hidden-state loss or None) for one batch whose student output is `student`."""
    if isinstance(teacher, TeacherLogitsCache):
        values, indices = teacher.targets(idx)
        return kl_topk_loss(student.logits, values.to(ids.device), indices.to(ids.device), mask,
                            temperature=temperature), None
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=hidden)
    kd = kl_distill_loss(student.logits, t_out.logits, mask, temperature=temperature, topk=topk)
    return kd, hidden_match_loss(student.hidden_states, t_out.hidden_states, mask) if hidden else None


def _teacher_identity(teacher: Teacher | None) -> Any:
    """What a resumable state records of the teacher: its logits cache's key, or its weights' checksum."""
    if isinstance(teacher, TeacherLogitsCache):
        return teacher.record["key"]  # teacher weights, data and K
    return None if teacher is None else run_key(teacher, {})
