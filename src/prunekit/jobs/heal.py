"""The `heal` job: load a (pruned) checkpoint, and optionally its teacher, run recovery (`prunekit.recovery`:
fine-tuning or distillation, full or LoRA), save it with its plan and the run's record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunekit.errors import RecoveryError
from prunekit.io.checkpoint import load_model, resolve_model_path
from prunekit.io.outputs import prepare_output
from prunekit.plans import PLAN_FILE, PruningPlan
from prunekit.recovery import check_settings, check_teacher, recover
from prunekit.recovery.sources import check_text_spec, parse_text_spec, training_data
from prunekit.save import save


def heal_checkpoint(model: str, out: str, *, text: str = "c4", samples: int = 64, seq_len: int = 512,
                    batch_size: int = 4, steps: int = 100, lr: float = 5e-5, warmup: float = 0.1,
                    weight_decay: float = 0.0, seed: int = 0, teacher: str | None = None, alpha: float | None = None,
                    temperature: float = 1.0, teacher_topk: int | None = None, lora: int | None = None,
                    gen_temperature: float = 1.0, prompt_text: str = "c4", use_cache: bool = True,
                    dtype: str = "float32", device: str = "cpu", force: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Load a checkpoint, `recover` it (distilling from `teacher` when given), save it to `out` with its plan
    (if it has one) plus the run's record appended to `plan.recovery`. Returns the record. Settings, the text
    spec and the output are checked before loading; the teacher's vocabulary before any training."""
    check_settings(steps=steps, lr=lr, batch_size=batch_size, warmup=warmup, alpha=alpha, temperature=temperature,
                   teacher_topk=teacher_topk, lora=lora)
    if teacher is None and (alpha not in (None, 1.0) or temperature != 1.0 or teacher_topk is not None):
        raise RecoveryError("--alpha, --temperature and --teacher-topk shape the distillation loss; give --teacher")
    sources = parse_text_spec(text)
    check_text_spec(sources, samples=samples, seq_len=seq_len, batch_size=batch_size, has_teacher=teacher is not None)
    prepare_output(out, force)
    net, tok = load_model(model, dtype=dtype, device=device)
    teacher_net = None
    if teacher is not None:
        teacher_net, teacher_tok = load_model(teacher, dtype=dtype, device=device)
        teacher_net.requires_grad_(False)
        check_teacher(net, teacher_net, tok, teacher_tok)
    data, records = training_data(tok, sources, samples, seq_len, teacher=teacher_net, prompt_text=prompt_text,
                                  gen_temperature=gen_temperature, seed=seed, batch_size=batch_size,
                                  use_cache=use_cache, progress=progress)
    plan_file = Path(resolve_model_path(model)) / PLAN_FILE
    plan = PruningPlan.load(plan_file) if plan_file.is_file() else PruningPlan(method="none")
    rec = recover(net, data, steps=steps, lr=lr, batch_size=batch_size, warmup=warmup, weight_decay=weight_decay,
                  seed=seed, teacher=teacher_net, alpha=alpha, temperature=temperature, teacher_topk=teacher_topk,
                  lora=lora, progress=progress)
    rec["source"] = str(model)
    rec["teacher"] = str(teacher) if teacher is not None else None
    rec["data_sources"] = records
    plan.recovery.append(rec)
    save(net, tok, out, plan, force=force)
    return rec
