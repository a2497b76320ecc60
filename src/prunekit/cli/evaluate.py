"""`prunekit eval`, `bench` and `compare`: perplexity, zero-shot tasks, speed and memory, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prunekit.cli.options import (
    MODEL_HELP,
    TEXT_HELP,
    add_bench,
    add_device,
    add_force,
    add_json,
    add_model,
    add_tasks,
    check_json_output,
    csv,
    emit,
    positive_int,
    progress,
    say,
    write_json,
)


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity, parameter count and KV-cache bytes per token",
                       description="Perplexity = exp(mean NLL) over non-overlapping windows of held-out text "
                                   "(the second half of the source).")
    add_model(p)
    p.add_argument("--text", default="wiki", help=f"evaluation text: {TEXT_HELP} (default wiki; second half used)")
    p.add_argument("--windows", type=positive_int, default=10, help="number of windows (default 10)")
    p.add_argument("--window-len", type=positive_int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (default 1)")
    add_tasks(p)
    add_json(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="prefill/decode speed, peak memory and KV-cache bytes",
                       description="Prefill and decode tokens/s (median of repeats after warm-up), peak resident "
                                   "memory, KV-cache bytes actually allocated, parameters and on-disk size.")
    add_model(p)
    add_bench(p)
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
    from prunekit.adapters import get_adapter
    from prunekit.data import eval_windows
    from prunekit.evaluation.perplexity import model_summary, perplexity
    from prunekit.evaluation.zeroshot import check_tasks, evaluate_tasks
    from prunekit.io.checkpoint import load_model
    from prunekit.io.files import weight_bytes
    from prunekit.jobs.dist import check_device

    dest = check_json_output(args, args.model, args.text, args.task_dir)
    check_device(args.device)
    tasks = csv(args.tasks) if args.tasks else []
    check_tasks(tasks, task_dir=args.task_dir)  # before the perplexity run, not after it
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    windows = eval_windows(tok, args.text, args.windows, args.window_len)
    result: dict[str, Any] = {"model": str(args.model), "text": str(args.text)}
    result.update(model_summary(get_adapter(model)))
    result.update(perplexity(model, windows, batch_size=args.batch_size, progress=progress(args)))
    if tasks:
        result["zeroshot"] = evaluate_tasks(model, tok, tasks, task_dir=args.task_dir, limit=args.limit,
                                            seed=args.seed, device=args.device)
    local = Path(str(args.model))
    if local.is_dir():
        result["disk_bytes"] = weight_bytes(local)
    write_json(result, dest)
    summary = {k: result[k] for k in ("perplexity", "params", "kv_bytes_per_token")}
    if tasks:
        summary["tasks"] = {name: {"acc": t["acc"], "acc_stderr": t["acc_stderr"], "n": t["n"]}
                            for name, t in result["zeroshot"]["tasks"].items()}
    return emit({"json": str(args.json), **summary})


def cmd_bench(args: argparse.Namespace) -> int:
    from prunekit.evaluation.bench import benchmark, format_table
    from prunekit.io.checkpoint import load_model, resolve_model_path
    from prunekit.io.files import weight_bytes
    from prunekit.jobs.dist import check_device

    dest = check_json_output(args, args.model) if args.json else None
    check_device(args.device)
    model, _ = load_model(args.model, dtype=args.dtype, device=args.device, tokenizer=False)
    res = benchmark(model, contexts=args.context, new_tokens=args.new_tokens, batch=args.batch,
                    repeats=args.repeats, progress=progress(args))
    local = Path(resolve_model_path(args.model))
    res["disk_bytes"] = weight_bytes(local) if local.is_dir() else None
    res["model"] = str(args.model)
    say(format_table(res))
    if dest is not None:
        write_json(res, dest)
    return emit(res)


def cmd_compare(args: argparse.Namespace) -> int:
    from prunekit.evaluation.compare import CompareOptions, compare

    opts = CompareOptions(text=args.text, windows=args.windows, window_len=args.window_len,
                          tasks=csv(args.tasks) if args.tasks else [], task_dir=args.task_dir, limit=args.limit,
                          seed=args.seed, contexts=args.context, new_tokens=args.new_tokens, batch=args.batch,
                          repeats=args.repeats, bench=not args.no_bench, interleave=not args.no_interleave,
                          calib=args.calib, device=args.device, dtype=args.dtype, progress=progress(args))
    compare([args.base, *args.pruned], args.out, opts, force=args.force)
    say((Path(args.out) / "report.md").read_text())
    return emit({"out": str(args.out), "report": str(Path(args.out) / "report.md")})
