"""`prunekit eval`, `bench` and `compare`: perplexity, zero-shot tasks, speed and memory, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prunekit.cli.options import (
    add_bench,
    add_device,
    add_force,
    add_json,
    add_options,
    add_tasks,
    csv,
    emit,
    positive_int,
    progress,
    run_one,
    say,
)
from prunekit.options import MODEL_HELP, BenchOptions, EvalOptions


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity, parameter count and KV-cache bytes per token",
                       description="Perplexity = exp(mean NLL) over non-overlapping windows of held-out text "
                                   "(the second half of the source).")
    add_options(p, EvalOptions)
    add_json(p, required=False)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="prefill/decode speed, peak memory and KV-cache bytes",
                       description="Prefill and decode tokens/s (median of repeats after warm-up), peak resident "
                                   "memory, KV-cache bytes actually allocated, parameters and on-disk size.")
    add_options(p, BenchOptions)
    add_json(p, required=False)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare", help="base vs pruned models side by side: perplexity, tasks, speed; report + plots",
                       description="Runs perplexity, the chosen zero-shot tasks and the speed benchmark on every "
                                   "model in one process, and writes report.md, report.json and PNG plots with "
                                   "ratios against the base model.")
    p.add_argument("base", help="the unpruned model: " + MODEL_HELP)
    p.add_argument("pruned", nargs="+", help="pruned checkpoints (or any other models) to compare")
    p.add_argument("--out", required=True, help="output directory for the report")
    add_force(p, "--out")
    p.add_argument("--card", default=None, metavar="DIR",
                   help="one of the pruned checkpoints: write its results beside the base model's into the "
                        "'Measured quality' section of its model card (DIR/README.md)")
    p.add_argument("--text", default="wiki", help="perplexity text (default wiki; second half used)")
    p.add_argument("--windows", type=positive_int, default=10, help="perplexity windows (default 10)")
    p.add_argument("--window-len", type=positive_int, default=1024, help="perplexity window length (default 1024)")
    p.add_argument("--calib", default="c4", help="text for the similarity heatmap when no plan carries scores")
    add_tasks(p)
    add_bench(p)
    p.add_argument("--no-bench", action="store_true", help="skip the speed benchmark")
    p.add_argument("--no-interleave", action="store_true",
                   help="benchmark models one after another instead of round-robin with all of them loaded "
                        "(use when they do not fit in memory together)")
    add_device(p)
    p.set_defaults(func=cmd_compare)


def cmd_eval(args: argparse.Namespace) -> int:
    return run_one(EvalOptions, args, args.json)


def cmd_bench(args: argparse.Namespace) -> int:
    return run_one(BenchOptions, args, args.json)


def cmd_compare(args: argparse.Namespace) -> int:
    from prunekit.evaluation.compare import CompareOptions, compare

    opts = CompareOptions(text=args.text, windows=args.windows, window_len=args.window_len,
                          tasks=csv(args.tasks) if args.tasks else [], task_dir=args.task_dir, limit=args.limit,
                          seed=args.seed, contexts=args.context, new_tokens=args.new_tokens, batch=args.batch,
                          repeats=args.repeats, bench=not args.no_bench, interleave=not args.no_interleave,
                          calib=args.calib, device=args.device, dtype=args.dtype, progress=progress(args))
    compare([args.base, *args.pruned], args.out, opts, force=args.force, card=args.card)
    say((Path(args.out) / "report.md").read_text())
    card = {"card": str(Path(args.card) / "README.md")} if args.card else {}
    return emit({"out": str(args.out), "report": str(Path(args.out) / "report.md"), **card})
