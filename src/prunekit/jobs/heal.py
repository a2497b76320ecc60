"""The `heal` job: load a (pruned) checkpoint, and optionally its teacher, run recovery (`prunekit.recovery`:
fine-tuning or distillation, full or LoRA), save it with its plan and the run's record."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.data import parse_text_spec
from prunekit.errors import RecoveryError
from prunekit.io.checkpoint import load_model, load_tokenizer, resolve_model_path
from prunekit.io.outputs import input_paths, prepare_output
from prunekit.jobs.dist import check_device
from prunekit.plans import PruningPlan, checkpoint_plan
from prunekit.recovery import DEFAULT_LR, check_hidden, check_settings, check_teacher, recover
from prunekit.recovery.distill import check_tokenizers
from prunekit.recovery.sources import check_text_spec, default_samples, training_data
from prunekit.recovery.state import remove_state
from prunekit.recovery.teacher_cache import DEFAULT_TOPK, TeacherLogitsCache, teacher_logits_cache
from prunekit.save import save


def heal_checkpoint(model: str, out: str, *, text: str = "mix", samples: int | None = None, seq_len: int = 512,
                    batch_size: int = 4, steps: int = 100, lr: float = DEFAULT_LR, warmup: float = 0.1,
                    weight_decay: float = 0.0, seed: int = 0, teacher: str | None = None, alpha: float | None = None,
                    temperature: float = 1.0, teacher_topk: int | None = None, lora: int | None = None,
                    hidden_weight: float = 0.0, gen_temperature: float = 1.0, prompt_text: str = "c4",
                    use_cache: bool = True, teacher_cache: bool = False, save_every: int = 0, dtype: str = "float32",
                    device: str = "cpu", force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Load a checkpoint, `recover` it (distilling from `teacher` when given), save it to `out` with its plan
    (if it has one) plus the run's record appended to `plan.recovery`. Returns the record. Settings, the text
    spec and the output are checked before loading; the teacher's vocabulary before any training.

    `teacher_cache`: run the teacher alone first and keep its top-K logits on disk (K = `teacher_topk`, 64 by
    default), so teacher and student are never in memory together. `samples=None`: as many text windows as
    the run reads, so none is read twice (`default_samples`). `save_every`: keep resumable training
    state in the sibling folder `state_dir(out)` every that many steps; the same command continues from it.
    `hidden_weight`: also match every layer's residual stream to the teacher's (`recover`)."""
    check_device(device)
    check_settings(steps=steps, lr=lr, batch_size=batch_size, warmup=warmup, alpha=alpha, temperature=temperature,
                   teacher_topk=teacher_topk, lora=lora, save_every=save_every, hidden_weight=hidden_weight)
    if teacher is None and (alpha not in (None, 1.0) or temperature != 1.0 or teacher_topk is not None
                            or teacher_cache or hidden_weight):
        raise RecoveryError("--alpha, --temperature, --teacher-topk, --teacher-cache and --hidden-weight shape the "
                            "distillation; give --teacher")
    if teacher_cache and hidden_weight:
        raise RecoveryError("--hidden-weight needs the teacher's hidden states, which --teacher-cache does not keep")
    sources = parse_text_spec(text)
    fit = samples is None  # the default is capped at what the texts hold; a --samples the user gave is not
    if samples is None:
        samples = default_samples(sources, steps=steps, batch_size=batch_size, seq_len=seq_len)
    check_text_spec(sources, samples=samples, seq_len=seq_len, batch_size=batch_size, has_teacher=teacher is not None)
    # The source's plan goes into the output: a bad one fails here, before any model is loaded.
    plan = checkpoint_plan(resolve_model_path(model)) or PruningPlan(method="none")
    dest = prepare_output(out, force, inputs=input_paths(model, teacher, text, prompt_text))
    gen = dict(prompt_text=prompt_text, gen_temperature=gen_temperature, seed=seed, use_cache=use_cache,
               progress=progress)
    signal: nn.Module | TeacherLogitsCache | None = None
    if teacher is not None and teacher_cache:
        # The teacher runs alone and is released before the student is loaded: peak memory is the larger of
        # the two, not their sum.
        teacher_net, teacher_tok = load_model(teacher, dtype=dtype, device=device)
        check_tokenizers(load_tokenizer(resolve_model_path(model), model), teacher_tok)
        data, records = training_data(teacher_tok, sources, samples, seq_len, fit=fit, teacher=teacher_net, **gen)
        signal = teacher_logits_cache(teacher_net, data, teacher_topk or DEFAULT_TOPK, batch_size=batch_size,
                                      use_cache=use_cache, progress=progress)
        del teacher_net
        gc.collect()
        net, tok = load_model(model, dtype=dtype, device=device)
    else:
        net, tok = load_model(model, dtype=dtype, device=device)
        if teacher is not None:
            signal, teacher_tok = load_model(teacher, dtype=dtype, device=device)
            signal.requires_grad_(False)
            check_teacher(net, signal, tok, teacher_tok)
            if hidden_weight:
                check_hidden(net, signal)
        data, records = training_data(tok, sources, samples, seq_len, fit=fit, teacher=signal, **gen)
    rec = recover(net, data, steps=steps, lr=lr, batch_size=batch_size, warmup=warmup, weight_decay=weight_decay,
                  seed=seed, teacher=signal, alpha=alpha, temperature=temperature,
                  teacher_topk=None if teacher_cache else teacher_topk, lora=lora, hidden_weight=hidden_weight,
                  state_dir=state_dir(out), save_every=save_every, progress=progress)
    rec["source"] = str(model)
    rec["teacher"] = str(teacher) if teacher is not None else None
    rec["data_sources"] = records
    plan.recovery.append(rec)
    save(net, tok, dest, plan)
    if save_every:  # the run is complete: nothing left to resume (a folder this run did not use is not ours)
        remove_state(state_dir(out))
    return rec


def state_dir(out: str | Path) -> Path:
    """Where `--save-every` keeps resumable state: a sibling of the output folder."""
    out = Path(out)
    return out.with_name(out.name + ".heal-state")
