"""Command line: `prunekit {score,drop,width,eval,demo} ...` (also `python -m prunekit`).

Command names, options and JSON keys are a contract that other tools read. Library code never sees the
argparse namespace: each command unpacks it and calls typed functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from prunekit.errors import PrunekitError

DEFAULT_MODEL_HELP = "built-in name (smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b), local HF checkpoint directory, or hub id"
TEXT_HELP = "built-in corpus (wiki, c4, tiny, code, technical, multilingual), or a local .txt/.jsonl file"


def write_json(data: Any, path: str | Path) -> None:
    """Write JSON all or nothing (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=DEFAULT_MODEL_HELP)
    p.add_argument("--dtype", default="float32", help="weights dtype for loading and computing (default float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="c4", help=f"calibration text: {TEXT_HELP} (default c4; its first half is used)")
    p.add_argument("--samples", type=int, default=16, help="number of calibration sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward pass (default 4)")


def _quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False))


def _add_scale(p: argparse.ArgumentParser) -> None:
    """Options for models larger than memory (layer streaming) and the score cache."""
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="load one decoder layer at a time from the safetensors files (--no-stream: whole model "
                        "in memory; default: stream only when the model would not fit in free memory)")
    p.add_argument("--offload-dir", default=None,
                   help="directory for the calibration hidden states of a streamed run (default: score and drop "
                        "keep them in the cache directory so an interrupted run resumes, or in RAM with --no-cache; "
                        "width keeps them in RAM)")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the score cache ($PRUNEKIT_CACHE/scores: similarity sums, and "
                        "width statistics per shot), no resuming")


# --- commands ----------------------------------------------------------------------------------------------

def cmd_score(args: argparse.Namespace) -> int:
    from prunekit.distributed import score_job

    # In memory or layer-streamed, one process or several under torchrun (rank 0 writes).
    result = score_job(str(args.model), calib=args.calib, samples=args.samples, seq_len=args.seq_len,
                       batch_size=args.batch_size, dtype=args.dtype, device=args.device, stream=args.stream,
                       offload_dir=args.offload_dir, use_cache=not args.no_cache, progress=not _quiet(args))
    if result is None:
        return 0
    out = result.scores.to_json()
    out["model"] = result.model_info
    write_json(out, args.json)
    how = ("streamed" if result.streamed else "in memory") + (", from cache" if result.cache_hit else "")
    print(f"scores for {result.scores.num_layers} layers ({how}) written to {args.json}")
    return 0


def cmd_drop(args: argparse.Namespace) -> int:
    from prunekit.distributed import drop_job

    # Fails on an existing --out before any expensive work; rank 0 saves under torchrun.
    plan = drop_job(str(args.model), args.out, target=args.target, n=args.n, consecutive=args.consecutive,
                    iterative=args.iterative, calib=args.calib, samples=args.samples, seq_len=args.seq_len,
                    batch_size=args.batch_size, dtype=args.dtype, device=args.device, stream=args.stream,
                    offload_dir=args.offload_dir, use_cache=not args.no_cache, force=args.force,
                    progress=not _quiet(args))
    if plan is None:
        return 0
    what = ", ".join(f"{d.module}@{d.layer}" for d in plan.dropped)
    print(f"dropped {len(plan.dropped)} ({what}); checkpoint written to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from prunekit.adapters import get_adapter
    from prunekit.checkpoint import load_model, weight_bytes
    from prunekit.data import eval_windows
    from prunekit.evaluate import model_summary, perplexity

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    adapter = get_adapter(model)
    windows = eval_windows(tok, args.text, args.windows, args.window_len)
    result: dict[str, Any] = {"model": str(args.model), "text": str(args.text)}
    result.update(model_summary(adapter))
    result.update(perplexity(model, windows, batch_size=args.batch_size, progress=not _quiet(args)))
    if args.tasks:
        from prunekit.zeroshot import evaluate_tasks

        result["zeroshot"] = evaluate_tasks(model, tok, _csv(args.tasks), task_dir=args.task_dir, limit=args.limit,
                                            seed=args.seed, device=args.device)
        for name, t in result["zeroshot"]["tasks"].items():
            print(f"{name}: acc {t['acc']:.4f} ± {t['acc_stderr']:.4f} (n={t['n']})")
        avg = result["zeroshot"].get("average")
        if avg:  # the papers' average: acc_norm or acc per task, as declared in prunekit.zeroshot.AVERAGE_METRIC
            used = ", ".join(f"{k}:{m}" for k, m in avg["metric"].items())
            se = f" ± {avg['stderr']:.4f}" if avg["stderr"] is not None else ""
            print(f"average {avg['value']:.4f}{se} ({used})")
    local = Path(str(args.model))
    if local.is_dir():
        result["disk_bytes"] = weight_bytes(local)
    write_json(result, args.json)
    print(f"perplexity {result['perplexity']:.3f}  params {result['params']:,}  "
          f"KV bytes/token {result['kv_bytes_per_token']:,}  -> {args.json}")
    return 0


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from prunekit.bench import benchmark, format_table
    from prunekit.checkpoint import load_model, resolve_model_path, weight_bytes

    model, _ = load_model(args.model, dtype=args.dtype, device=args.device, tokenizer=False)
    res = benchmark(model, contexts=args.context, new_tokens=args.new_tokens, batch=args.batch,
                    repeats=args.repeats, progress=not _quiet(args))
    local = Path(resolve_model_path(args.model))
    res["disk_bytes"] = weight_bytes(local) if local.is_dir() else None
    res["model"] = str(args.model)
    print(format_table(res))
    if args.json:
        write_json(res, args.json)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from prunekit.compare import CompareOptions, compare

    opts = CompareOptions(text=args.text, windows=args.windows, window_len=args.window_len,
                          tasks=_csv(args.tasks) if args.tasks else [], task_dir=args.task_dir, limit=args.limit,
                          seed=args.seed, contexts=args.context, new_tokens=args.new_tokens, batch=args.batch,
                          repeats=args.repeats, bench=not args.no_bench, interleave=not args.no_interleave,
                          calib=args.calib, device=args.device,
                          dtype=args.dtype, progress=not _quiet(args))
    compare([args.base, *args.pruned], args.out, opts)
    print((Path(args.out) / "report.md").read_text())
    return 0


def _add_tasks(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=None,
                   help="comma-separated zero-shot tasks run through lm-eval on the in-memory model "
                        "(built-in: mmlu; or names of YAMLs in --task-dir)")
    p.add_argument("--task-dir", default=None,
                   help="folder of your own lm-eval task YAMLs (see prunekit.zeroshot for local JSONL tasks)")
    p.add_argument("--limit", type=int, default=None, help="at most this many examples per task (quick runs)")
    p.add_argument("--seed", type=int, default=1234, help="seed for lm-eval and the benchmark inputs (default 1234)")


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=_ints, default=(128, 512, 1024),
                   help="comma-separated context lengths to measure (default 128,512,1024)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per measurement (default 32)")
    p.add_argument("--batch", type=int, default=1, help="sequences per batch (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up; median reported (default 3)")


def cmd_demo(args: argparse.Namespace) -> int:
    from prunekit.demo import run_demo

    run_demo(model=args.model, out_dir=Path(args.out), calib=args.calib, text=args.text, samples=args.samples,
             seq_len=args.seq_len, windows=args.windows, window_len=args.window_len, drops=args.drops,
             with_width=not args.no_width, progress=not _quiet(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit",
        description="Structured pruning of Hugging Face causal LMs: LLM-Drop layer dropping and TransAct "
                    "width pruning, with side-by-side measurements.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("score", help="LLM-Drop similarity scores of every layer (block, attention, MLP)",
                       description="One calibration pass; for every layer, the mean cosine similarity of the "
                                   "residual stream before/after the block, the attention and the MLP.")
    _add_model(p)
    _add_calib(p)
    _add_scale(p)
    p.add_argument("--json", required=True, help="output JSON path")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("drop", help="drop the most redundant attention/MLP/blocks and save a smaller checkpoint",
                       description="LLM-Drop: score, drop the n most redundant modules, save the smaller model "
                                   "with its tokenizer and prunekit_plan.json.")
    _add_model(p)
    p.add_argument("--target", required=True, choices=["attn", "mlp", "block", "joint"],
                   help="attn: Attention Drop; mlp: MLP Drop; block: Block Drop; joint: attention and MLP "
                        "modules ranked together")
    p.add_argument("--n", type=int, required=True, help="number of modules (layers, for block) to drop")
    p.add_argument("--consecutive", action="store_true",
                   help="Block Drop of the best consecutive run of n blocks (by cos(h_i, h_{i+n}))")
    p.add_argument("--iterative", action="store_true",
                   help="drop one module at a time and re-score the layers after it (default: one-shot)")
    _add_calib(p)
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    _add_scale(p)
    p.set_defaults(func=cmd_drop)

    from prunekit import cli_heal, cli_width

    _add_scale(cli_width.add_parser(sub))
    cli_heal.add_parser(sub)

    p = sub.add_parser("eval", help="perplexity, parameter count and KV-cache bytes per token",
                       description="Perplexity = exp(mean NLL) over non-overlapping windows of held-out text "
                                   "(the second half of the source).")
    _add_model(p)
    p.add_argument("--text", default="wiki", help=f"evaluation text: {TEXT_HELP} (default wiki; second half used)")
    p.add_argument("--windows", type=int, default=10, help="number of windows (default 10)")
    p.add_argument("--window-len", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    _add_tasks(p)
    p.add_argument("--json", required=True, help="output JSON path")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="prefill/decode speed, peak memory and KV-cache bytes",
                       description="Prefill and decode tokens/s (median of repeats after warm-up), peak resident "
                                   "memory, KV-cache bytes actually allocated, parameters and on-disk size.")
    _add_model(p)
    _add_bench(p)
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare", help="base vs pruned models side by side: perplexity, tasks, speed; report + plots",
                       description="Runs perplexity, the chosen zero-shot tasks and the speed benchmark on every "
                                   "model in one process, and writes report.md, report.json and PNG plots with "
                                   "ratios against the base model.")
    p.add_argument("base", help="the unpruned model: " + DEFAULT_MODEL_HELP)
    p.add_argument("pruned", nargs="+", help="pruned checkpoints (or any other models) to compare")
    p.add_argument("--out", required=True, help="output directory for the report")
    p.add_argument("--text", default="wiki", help="perplexity text (default wiki; second half used)")
    p.add_argument("--windows", type=int, default=10, help="perplexity windows (default 10)")
    p.add_argument("--window-len", type=int, default=1024, help="perplexity window length (default 1024)")
    p.add_argument("--calib", default="c4", help="text for the similarity heatmap when no plan carries scores")
    _add_tasks(p)
    _add_bench(p)
    p.add_argument("--no-bench", action="store_true", help="skip the speed benchmark")
    p.add_argument("--no-interleave", action="store_true",
                   help="benchmark models one after another instead of round-robin with all of them loaded "
                        "(use when they do not fit in memory together)")
    p.add_argument("--dtype", default="float32", help="dtype to load models in (default float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the main job on the built-in SmolLM2: score, drop 4 and 8 attention layers, "
                                    "evaluate side by side",
                       description="Scores the model, drops attention layers, evaluates dense vs pruned on held-"
                                   "out text, and writes a Markdown table and a similarity heatmap.")
    p.add_argument("--model", default="smollm2-135m", help=DEFAULT_MODEL_HELP + " (default smollm2-135m)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--calib", default="c4", help="calibration text (default c4)")
    p.add_argument("--text", default="wiki", help="evaluation text (default wiki)")
    p.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length (default 512)")
    p.add_argument("--windows", type=int, default=10, help="perplexity windows (default 10)")
    p.add_argument("--window-len", type=int, default=1024, help="perplexity window length (default 1024)")
    p.add_argument("--drops", default="4,8", help="comma-separated numbers of attention layers to drop (default 4,8)")
    p.add_argument("--no-width", action="store_true", help="skip the TransAct width-pruning row")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own bars (loading, converting, saving)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PrunekitError as e:
        print(f"prunekit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # The environment, not the input: a path that cannot be written, a full disk. One line, as above;
        # outputs are committed by rename only when complete, so nothing half-written is left.
        print(f"prunekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
