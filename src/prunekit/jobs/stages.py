"""Stages: each command a recipe can run, as typed options -> job -> the summary the CLI prints.

A stage writes to a `Target` checked before any work (`io.outputs.prepare_output`); its runner returns the
JSON summary, or None on the ranks other than 0 of a torchrun job (they write nothing).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Callable

from prunekit.io.outputs import Kind, Target
from prunekit.options import (
    BenchOptions,
    CompressOptions,
    DropOptions,
    EvalOptions,
    ExportOptions,
    HealOptions,
    Options,
    ScoreOptions,
    WidthOptions,
)

Summary = dict[str, Any]


@dataclass(frozen=True)
class StageKind:
    options: type[Options]
    run: Callable[[Any, Target, bool], Summary | None]
    # What it writes: a checkpoint folder (later stages can start from it), an export (a file or a folder), a JSON
    # file, or a JSON file only when one is asked for ("json?").
    output: str

    def output_kind(self, opts: Options) -> Kind:
        if self.output == "export":
            return "file" if opts.format == "gguf" else "dir"  # type: ignore[attr-defined]
        return "dir" if self.output == "checkpoint" else "file"


def run_score(o: ScoreOptions, dest: Target, progress: bool) -> Summary | None:
    from prunekit.io.outputs import write_json
    from prunekit.jobs.score import score_job

    result = score_job(o.model, calib=o.calib, samples=o.samples, seq_len=o.seq_len, batch_size=o.batch_size,
                       dtype=o.dtype, device=o.device, stream=o.stream, offload_dir=o.offload_dir,
                       use_cache=o.use_cache, progress=progress)
    if result is None:
        return None
    out = result.scores.to_json()
    out["model"] = result.model_info
    write_json(out, dest)
    return {"json": str(dest), "layers": result.scores.num_layers, "streamed": result.streamed,
            "cache_hit": result.cache_hit}


def run_drop(o: DropOptions, dest: Target, progress: bool) -> Summary | None:
    from prunekit.jobs.drop import drop_job

    plan = drop_job(o.model, dest, target=o.target, n=o.n, consecutive=o.consecutive, iterative=o.iterative,
                    calib=o.calib, samples=o.samples, seq_len=o.seq_len, batch_size=o.batch_size, dtype=o.dtype,
                    device=o.device, stream=o.stream, offload_dir=o.offload_dir, use_cache=o.use_cache,
                    repair=o.repair, criterion=o.criterion, prefilter=o.prefilter, expert_score=o.expert_score,
                    progress=progress)
    if plan is None:
        return None
    summary: Summary = {"out": str(dest), "method": plan.method,
                        "dropped": [f"{d.module}@{d.layer}" for d in plan.dropped]}
    if any(w.experts is not None for w in plan.widths.values()):  # expert drop: the experts kept per layer
        summary["experts_kept"] = {str(i): w.experts for i, w in sorted(plan.widths.items())}
    if plan.repair:
        summary["repair"] = {k: plan.repair[k] for k in ("check_loss_unrepaired", "check_loss")}
        summary["repair"]["applied"] = sum(s["applied"] for s in plan.repair["spans"])
    return summary


def run_width(o: WidthOptions, dest: Target, progress: bool) -> Summary | None:
    from prunekit.jobs.width import width_job

    result = width_job(o.model, dest, mlp_keep=o.mlp_keep, heads_keep=o.heads_keep, mode=o.mode, shots=o.shots,
                       scorer=o.scorer, head_mode=o.head_mode, min_layer_keep=o.min_layer_keep,
                       multiple_of=o.multiple_of, calib=o.calib, samples=o.samples, seq_len=o.seq_len,
                       batch_size=o.batch_size, dtype=o.dtype, device=o.device, stream=o.stream,
                       offload_dir=o.offload_dir, use_cache=o.use_cache, progress=progress)
    if result is None:
        return None
    plan, streamed = result
    return {
        "out": str(dest), "method": plan.method, "streamed": streamed,
        "parameters_before": plan.options["parameters_before"], "parameters_after": plan.options["parameters_after"],
        # Heterogeneous = layers of different widths, saved with prunekit's loader (see io/checkpoint.py).
        "heterogeneous": bool(json.loads((dest.path / "config.json").read_text()).get("prunekit")),
        # One short line per layer: the widths it ended with.
        "widths": {k: " ".join(f"{n}={v}" for n, v in w.items())
                   for k, w in (plan.history[-1]["widths"] if plan.history else {}).items()},
    }


def run_compress(o: CompressOptions, dest: Target, progress: bool) -> Summary | None:
    from prunekit.jobs.compress import compress_job
    from prunekit.losses import loss_perplexity

    result = compress_job(o.model, dest, budget=o.budget, rounds=o.rounds, multiple_of=o.multiple_of, calib=o.calib,
                          samples=o.samples, seq_len=o.seq_len, batch_size=o.batch_size, criterion=o.criterion,
                          repair=o.repair, dtype=o.dtype, device=o.device, stream=o.stream,
                          offload_dir=o.offload_dir, progress=progress, correct=o.correct,
                          probe_samples=o.probe_samples, use_cache=o.use_cache)
    if result is None:
        return None
    chosen = next(c for c in result.candidates if c["name"] == result.chosen)
    summary: Summary = {"out": str(dest), "method": "compress", "budget": o.budget, "chosen": result.chosen,
                        "removed_params": chosen["removed_params"], "removed_kv": chosen["removed_kv"],
                        "check_ppl": chosen["check_ppl"],
                        "dropped": [f"{d.module}@{d.layer}" for d in result.plan.dropped],
                        "narrowed_layers": sorted(result.plan.widths)}
    corr = result.plan.options.get("correction")
    if corr is not None:
        summary["correction"] = {k: corr[k] for k in ("applied", "check_value_uncorrected", "check_value")}
    rep = result.plan.repair
    if rep and rep.get("spans"):
        summary["repair"] = {"check_ppl_unrepaired": loss_perplexity(rep["check_loss_unrepaired"]),
                             "check_ppl": loss_perplexity(rep["check_loss"]),
                             "applied": sum(s["applied"] for s in rep["spans"]), "spans": len(rep["spans"])}
    return summary


def run_heal(o: HealOptions, dest: Target, progress: bool) -> Summary:
    from prunekit.jobs.heal import heal_checkpoint
    from prunekit.recovery import DEFAULT_LR

    rec = heal_checkpoint(o.model, dest, text=o.text, samples=o.samples, seq_len=o.seq_len,
                          batch_size=o.batch_size, steps=o.steps, lr=DEFAULT_LR if o.lr is None else o.lr,
                          warmup=o.warmup, weight_decay=o.weight_decay, seed=o.seed, teacher=o.teacher,
                          alpha=o.alpha, temperature=o.temperature, teacher_topk=o.teacher_topk, lora=o.lora,
                          hidden_weight=o.hidden_weight, gen_temperature=o.gen_temperature,
                          prompt_text=o.prompt_text, use_cache=o.use_cache, teacher_cache=o.teacher_cache,
                          save_every=o.save_every, dtype=o.dtype, device=o.device, progress=progress)
    keys = ("method", "steps", "lr", "tokens_seen", "loss_first", "loss_last_10pct_mean", "seconds")
    return {"out": str(dest), **{k: rec[k] for k in keys}}


def run_export(o: ExportOptions, dest: Target, progress: bool) -> Summary:
    from prunekit.export import export_checkpoint

    out = export_checkpoint(o.model, dest, format=o.format, quant=o.quant, progress=progress)
    return {"out": str(out), "format": o.format, "quant": o.quant}


def run_eval(o: EvalOptions, dest: Target | None, progress: bool) -> Summary:
    from prunekit.errors import OptionError
    from prunekit.io.outputs import write_json
    from prunekit.jobs.evaluate import eval_job

    if dest is None and not o.card:
        raise OptionError("eval writes its results to --json, to the model card (--card), or both; give one")
    tasks = o.task_list()
    result = eval_job(o.model, text=o.text, windows=o.windows, window_len=o.window_len, batch_size=o.batch_size,
                      tasks=tasks, task_dir=o.task_dir, limit=o.limit, seed=o.seed, dtype=o.dtype, device=o.device,
                      progress=progress, card=o.card)
    if dest is not None:
        write_json(result, dest)
    summary = {k: result[k] for k in ("perplexity", "params", "kv_bytes_per_token")}
    if tasks:
        summary["tasks"] = {name: {"acc": t["acc"], "acc_stderr": t["acc_stderr"], "n": t["n"]}
                            for name, t in result["zeroshot"]["tasks"].items()}
    return {"json": None if dest is None else str(dest), **({"card": result["card"]} if o.card else {}), **summary}


def run_bench(o: BenchOptions, dest: Target | None, progress: bool) -> Summary:
    from prunekit.evaluation.bench import format_table
    from prunekit.io.outputs import write_json
    from prunekit.jobs.evaluate import bench_job

    res = bench_job(o.model, contexts=o.context, new_tokens=o.new_tokens, batch=o.batch, repeats=o.repeats,
                    dtype=o.dtype, device=o.device, progress=progress)
    print(format_table(res), file=sys.stderr)  # the table for people; the summary is the JSON
    if dest is not None:
        write_json(res, dest)
    return res


STAGES: dict[str, StageKind] = {
    "score": StageKind(ScoreOptions, run_score, "json"),
    "drop": StageKind(DropOptions, run_drop, "checkpoint"),
    "width": StageKind(WidthOptions, run_width, "checkpoint"),
    "compress": StageKind(CompressOptions, run_compress, "checkpoint"),
    "heal": StageKind(HealOptions, run_heal, "checkpoint"),
    "export": StageKind(ExportOptions, run_export, "export"),
    "eval": StageKind(EvalOptions, run_eval, "json?"),
    "bench": StageKind(BenchOptions, run_bench, "json?"),
}
