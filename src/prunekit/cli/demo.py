"""`prunekit demo`: the main job on the built-in SmolLM2, end to end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prunekit.cli.options import add_force, emit, positive_int, progress
from prunekit.options import MODEL_HELP


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="the main job on the built-in SmolLM2: score, drop 4 and 8 attention layers, "
                                    "evaluate side by side",
                       description="Scores the model, drops attention layers, evaluates dense vs pruned on held-"
                                   "out text, and writes a Markdown table and a similarity heatmap.")
    p.add_argument("--model", default="smollm2-135m", help=MODEL_HELP + " (default smollm2-135m)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    add_force(p, "--out")
    p.add_argument("--calib", default="c4", help="calibration text (default c4)")
    p.add_argument("--text", default="wiki", help="evaluation text (default wiki)")
    p.add_argument("--samples", type=positive_int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="calibration sequence length (default 512)")
    p.add_argument("--windows", type=positive_int, default=10, help="perplexity windows (default 10)")
    p.add_argument("--window-len", type=positive_int, default=1024, help="perplexity window length (default 1024)")
    p.add_argument("--drops", default="4,8", help="comma-separated numbers of attention layers to drop (default 4,8)")
    p.add_argument("--no-width", action="store_true", help="skip the TransAct width-pruning row")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from prunekit.demo import run_demo

    run_demo(model=args.model, out_dir=Path(args.out), calib=args.calib, text=args.text, samples=args.samples,
             seq_len=args.seq_len, windows=args.windows, window_len=args.window_len, drops=args.drops,
             with_width=not args.no_width, force=args.force, progress=progress(args))
    return emit({"out": args.out, "report": str(Path(args.out) / "report.md")})
