"""Recovery after pruning the built-in SmolLM2-135M: causal-LM fine-tuning vs distillation vs LoRA
distillation vs distillation on text the teacher wrote, at EQUAL training tokens.

The dense model is pruned (--prune: LLM-Drop of --drop attention modules, TransAct MLP width, or `prunekit compress
--budget B` with its defaults, B = --budget, default params=0.8; each calibrated on --calib-samples x 512 tokens of
c4's calibration half), then each row heals a deep copy of the pruned model on the same training windows (`prunekit
heal`'s default text `mix`: the calibration halves of every built-in text, weighted by size; as many windows as the
run reads, so each is read once) and is evaluated on held-out windows of wiki and of c4 (each text's EVALUATION
half; the training never reads it and nothing is tuned on it), and on LAMBADA's passages (novels, in no built-in
text, so outside every training mix). The learning rates are fixed in advance (`prunekit heal`'s default for full
fine-tuning, chosen on calibration windows by bench_heal_recipe.py; 5e-4 for LoRA), never searched on the
evaluation halves. The `teacher` row distils on `teacher:N` text instead (N = the text rows' windows x --seq-len,
prompts from c4's calibration half, sampled at temperature 1), so it reads exactly as many tokens, each once when
the text rows do. Peak RSS is sampled during each row. Prints a table and writes JSON.

    nice -n 10 .venv/bin/python benchmarks/bench_heal.py [--steps 16] [--batch-size 4] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from prunekit.adapters import get_adapter
from prunekit.compress import DEFAULT_SAMPLES, compress, parse_budget
from prunekit.data import TextSource, calibration_data, eval_windows, parse_text_spec
from prunekit.data import windows as cut_windows
from prunekit.drop import llm_drop
from prunekit.evaluation.bench import PeakRSS
from prunekit.evaluation.perplexity import perplexity as evaluate_perplexity
from prunekit.evaluation.task_data import prepare_paper_task
from prunekit.io.checkpoint import load_model
from prunekit.io.outputs import write_json
from prunekit.recovery import DEFAULT_LR, TEACHER_ALPHA, recover
from prunekit.recovery.sources import default_samples, training_data
from prunekit.surgery import count_parameters
from prunekit.width import width_prune


def ppl(model: nn.Module, windows: torch.Tensor) -> float:
    return float(evaluate_perplexity(model, windows, progress=False)["perplexity"])


def other_text(model: nn.Module, windows: torch.Tensor, dense: float, k: int) -> dict[str, float]:
    """The k-th evaluation text's perplexity and ratio to dense (keys `perplexity_k`, `ratio_to_dense_k`): a
    check that a row did not just learn the first text's domain from its calibration half."""
    val = ppl(model, windows)
    return {f"perplexity_{k}": val, f"ratio_to_dense_{k}": val / dense}


def lambada_windows(tokenizer: Any, n: int, length: int) -> torch.Tensor:
    """`n` consecutive windows of LAMBADA's passages (lambada_openai test, BookCorpus novels), joined by blank
    lines: text from outside every built-in text, so outside the training mix, for a check of whether a row
    learnt its training texts rather than the model's behaviour."""
    with prepare_paper_task("lambada").open() as f:
        text = "\n\n".join(json.loads(line)["text"] for line in f)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return cut_windows(ids, n, length, spread=False, what="LAMBADA's passages")


def report(args: argparse.Namespace, plan: Any, train: Any, sources: list[dict[str, Any]],
           rows: list[dict[str, Any]], *, done: bool, teacher_data: list[dict[str, Any]] | None = None) -> None:
    if done:
        print(f"\n{'row':<44} {args.eval:>8} {'x dense':>8} {args.eval2:>8} {'x dense':>8} {'LAMBADA':>8} "
              f"{'x dense':>8} {'tokens':>8} {'min':>6} {'RSS GiB':>8}")
        for r in rows:
            print(f"{r['row']:<44} {r['perplexity']:>8.2f} {r['ratio_to_dense']:>8.3f} {r['perplexity_2']:>8.2f} "
                  f"{r['ratio_to_dense_2']:>8.3f} {r['perplexity_3']:>8.2f} {r['ratio_to_dense_3']:>8.3f} "
                  f"{r.get('tokens_seen', ''):>8} "
                  f"{r.get('minutes', ''):>6} {r.get('peak_rss_gib', ''):>8}")
    out = {
        "model": args.model, "pruning": plan.method,
        "dropped": [f"{d.module}@{d.layer}" for d in plan.dropped],
        "mlp_widths": {str(k): len(w.channels) for k, w in plan.widths.items() if w.channels is not None},
        "complete": done,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "train_data": {**train.describe(), "sources": sources},
        "teacher_data": teacher_data,
        "eval": f"{args.eval} eval half, {args.windows} x {args.window_len}",
        "eval_2": f"{args.eval2} eval half, {args.windows} x {args.window_len}",
        "eval_3": f"LAMBADA (lambada_openai test passages, joined), first {args.windows} x {args.window_len}",
        "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": psutil.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_average_1m": os.getloadavg()[0]},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, args.json, force=True)
    if done:
        print(f"wrote {args.json}")


def add_prune_args(p: argparse.ArgumentParser) -> None:
    """The pruning options, shared with bench_heal_recipe.py so that its proxy runs heal the same model."""
    p.add_argument("--prune", choices=("attn", "mlp", "compress"), default="attn",
                   help="attn: LLM-Drop of --drop attention modules; mlp: TransAct per-layer MLP width keeping "
                        "--mlp-keep of the channels in 8 shots; compress: `prunekit compress --budget BUDGET` "
                        "with its defaults (default attn)")
    p.add_argument("--drop", type=int, default=8, help="attention modules dropped (default 8)")
    p.add_argument("--mlp-keep", type=float, default=0.5, help="MLP channels kept with --prune mlp (default 0.5)")
    p.add_argument("--budget", default="params=0.8",
                   help="compress's budget with --prune compress (default params=0.8)")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="calibration sequences of 512 for the pruning (default 16, compress's own default with "
                        "--prune compress)")


def prune(dense: nn.Module, tok: Any, args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    """A pruned copy of `dense` as --prune says, calibrated on c4's calibration half; its plan and a label."""
    pruned = copy.deepcopy(dense)
    pruned.requires_grad_(True)
    if args.calib_samples is None:
        args.calib_samples = DEFAULT_SAMPLES if args.prune == "compress" else 16
    calib = calibration_data(tok, "c4", args.calib_samples, 512)
    if args.prune == "attn":
        plan = llm_drop(pruned, get_adapter(pruned), calib, target="attn", n=args.drop, progress=False)
        return pruned, plan, f"attention drop {args.drop}"
    if args.prune == "mlp":
        plan = width_prune(pruned, get_adapter(pruned), calib, mlp_keep=args.mlp_keep, mode="per-layer", shots=8,
                           progress=False)
        return pruned, plan, f"MLP keep {args.mlp_keep:g} per-layer, 8 shots"
    # exactly `prunekit compress MODEL --budget B`: its defaults, its calibration (c4, 64 x 512)
    plan = compress(pruned, get_adapter(pruned), calib, parse_budget(args.budget), progress=False,
                    source=args.model).plan
    return pruned, plan, f"compress {args.budget}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    add_prune_args(p)
    p.add_argument("--text", default="mix",
                   help="training text spec as `prunekit heal --text`, calibration halves only (default mix)")
    p.add_argument("--samples", type=int, default=None,
                   help="training windows (default steps x batch size, as `prunekit heal`: each read once)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training window (default 512)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per row (default 100, as `prunekit heal`)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="full fine-tuning peak lr (default: prunekit heal's)")
    p.add_argument("--lora-lr", type=float, default=5e-4, help="LoRA peak lr (default 5e-4)")
    p.add_argument("--alpha", type=float, default=None,
                   help="weight of the causal-LM loss in the distillation rows' mix (default: prunekit heal's)")
    p.add_argument("--lora", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="weight of the hidden-state loss in the distillation rows (default 0: logits only)")
    p.add_argument("--eval", default="wiki", help="evaluation text, its held-out half (default wiki)")
    p.add_argument("--eval2", default="c4", help="second evaluation text, its held-out half (default c4)")
    p.add_argument("--windows", type=int, default=10, help="perplexity windows (default 10)")
    p.add_argument("--window-len", type=int, default=1024, help="tokens per perplexity window (default 1024)")
    p.add_argument("--rows", default="distill,ce,lora",
                   help="rows to train, in this order: distill, ce, lora, teacher (default distill,ce,lora)")
    p.add_argument("--json", default="benchmarks/results/heal.json")
    args = p.parse_args()
    unknown = set(args.rows.split(",")) - {"distill", "ce", "lora", "teacher"}
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; choose from distill, ce, lora, teacher")
    torch.manual_seed(0)

    dense, tok = load_model(args.model)
    dense.requires_grad_(False)
    wins = eval_windows(tok, args.eval, args.windows, args.window_len)
    wins2 = eval_windows(tok, args.eval2, args.windows, args.window_len)
    wins3 = lambada_windows(tok, args.windows, args.window_len)
    # Without --samples, exactly `prunekit heal`'s default: as many windows as the run reads, capped at the text.
    spec = parse_text_spec(args.text)
    samples = args.samples or default_samples(spec, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len)
    train, sources = training_data(tok, spec, samples, args.seq_len, fit=args.samples is None)
    dense_ppl2 = ppl(dense, wins2)
    dense_ppl3 = ppl(dense, wins3)
    t0 = time.perf_counter()
    dense_ppl = ppl(dense, wins)
    print(f"dense perplexity {dense_ppl:.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)

    pruned, plan, what = prune(dense, tok, args)
    pruned_ppl = ppl(pruned, wins)
    print(f"pruned perplexity {pruned_ppl:.2f} ({what})", flush=True)

    n_train = int(train.input_ids.shape[0])
    alpha = TEACHER_ALPHA if args.alpha is None else args.alpha
    hid = f", hidden x {args.hidden_weight:g}" if args.hidden_weight else ""
    kd = dict(teacher=dense, alpha=alpha, hidden_weight=args.hidden_weight)
    specs = {
        "distill": (f"distillation from dense (alpha {alpha:g}{hid})", dict(lr=args.lr, **kd)),
        "ce": ("causal-LM fine-tuning", dict(lr=args.lr)),
        "lora": (f"LoRA r={args.lora} distillation{hid}", dict(lr=args.lora_lr, lora=args.lora, **kd)),
        "teacher": (f"distillation on teacher:{n_train * args.seq_len}{hid}", dict(lr=args.lr, **kd)),
    }
    teacher_train, teacher_data = None, None
    if "teacher" in args.rows.split(","):
        # As many windows as the text rows read; generated once and cached (`prunekit heal --text teacher:N`).
        t = time.perf_counter()
        teacher_train, teacher_data = training_data(
            tok, [TextSource("teacher", teacher_tokens=n_train * args.seq_len)], n_train, args.seq_len,
            teacher=dense, progress=True)
        print(f"teacher text: {int(teacher_train.input_ids.shape[0])} windows in {time.perf_counter() - t:.0f}s",
              flush=True)
    rows_spec = [(r, *specs[r]) for r in args.rows.split(",")]
    rows: list[dict[str, Any]] = [
        {"row": "dense", "perplexity": dense_ppl, "ratio_to_dense": 1.0, "params": count_parameters(dense),
         "perplexity_2": dense_ppl2, "ratio_to_dense_2": 1.0, "perplexity_3": dense_ppl3, "ratio_to_dense_3": 1.0},
        {"row": f"{what}, no healing", "perplexity": pruned_ppl,
         "ratio_to_dense": pruned_ppl / dense_ppl, "params": count_parameters(pruned),
         **other_text(pruned, wins2, dense_ppl2, 2), **other_text(pruned, wins3, dense_ppl3, 3)},
    ]
    for key, name, kw in rows_spec:
        student = copy.deepcopy(pruned)
        t = time.perf_counter()
        with PeakRSS() as mem:
            data = teacher_train if key == "teacher" else train
            rec = recover(student, data, steps=args.steps, batch_size=args.batch_size, progress=False, **kw)
        minutes = (time.perf_counter() - t) / 60
        val = ppl(student, wins)
        rows.append({"row": name, "perplexity": val, "ratio_to_dense": val / dense_ppl,
                     **other_text(student, wins2, dense_ppl2, 2), **other_text(student, wins3, dense_ppl3, 3),
                     "params": count_parameters(student), "tokens_seen": rec["tokens_seen"],
                     "minutes": round(minutes, 2), "peak_rss_gib": round(mem.peak / 2**30, 2),
                     "lr": kw["lr"], "alpha": kw.get("alpha"),
                     "hidden_weight": kw.get("hidden_weight"), "method": rec["method"], "loss_first": rec["loss_first"],
                     "loss_last_10pct_mean": rec["loss_last_10pct_mean"]})
        print(f"{name}: perplexity {val:.2f} in {minutes:.1f} min", flush=True)
        # a run cut short still leaves the rows it measured
        report(args, plan, train, sources, rows, done=False, teacher_data=teacher_data)
        del student

    report(args, plan, train, sources, rows, done=True, teacher_data=teacher_data)


if __name__ == "__main__":
    main()
