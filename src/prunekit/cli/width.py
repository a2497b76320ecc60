"""`prunekit width`: TransAct width pruning (attention heads and MLP channels) to a smaller dense checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prunekit.cli.options import add_calib, add_model, add_output, add_scale, emit, parse_keep, progress

# Choices spelled out here so that building the CLI parser does not import torch; a test checks them against
# `prunekit.width.SCORERS` and `prunekit.width.HEAD_MODES`.
SCORER_NAMES: tuple[str, ...] = ("activation", "weight-activation")
HEAD_MODE_NAMES: tuple[str, ...] = ("kv-groups", "query-heads")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "width",
        help="TransAct width pruning: remove the weakest attention heads and MLP channels (activation-ranked, "
             "GQA-aware, iterative) and save a smaller dense checkpoint",
        description="Rank attention heads (KV groups or query heads) and MLP intermediate channels by the norm of "
                    "their activations on calibration text and remove the weakest in several shots, re-scoring in "
                    "between. The hidden size never changes. A keep value containing '.' or <= 1 is a ratio of each "
                    "layer's width, otherwise an absolute count per layer.",
    )
    add_model(p)
    p.add_argument("--mlp-keep", type=parse_keep, default=None, metavar="R|N",
                   help="MLP intermediate channels to keep per layer: ratio (e.g. 0.75) or count (e.g. 1152); "
                        "default: MLPs unchanged")
    p.add_argument("--heads-keep", type=parse_keep, default=None, metavar="R|N",
                   help="attention to keep per layer: with --head-mode kv-groups the number (or ratio) of KV "
                        "groups, each with all its query heads; with --head-mode query-heads the number (or ratio) "
                        "of query heads, a multiple of the KV heads (1 is a ratio: keep all; 0.34 keeps 1 of 3 groups); "
                        "default: attention unchanged")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--uniform", dest="mode", action="store_const", const="uniform",
                      help="every layer keeps the same width (default)")
    mode.add_argument("--per-layer", dest="mode", action="store_const", const="per-layer",
                      help="rank units globally across layers (scores normalised per layer) with a per-layer floor; "
                           "the total kept equals what --uniform would keep")
    p.set_defaults(mode="uniform")
    p.add_argument("--shots", type=int, default=8,
                   help="reach the target in this many pruning steps (geometric schedule), re-scoring in between "
                        "(default 8)")
    p.add_argument("--scorer", choices=SCORER_NAMES, default="activation",
                   help="importance: activation = L2 norm of the activation (TransAct); weight-activation = "
                        "|W| * ||x|| summed over the output projection's columns (Wanda-sp/FLAP) (default activation)")
    p.add_argument("--head-mode", choices=HEAD_MODE_NAMES, default="kv-groups",
                   help="kv-groups: remove whole KV groups with their query heads; query-heads: remove query heads "
                        "evenly inside every group, keeping all KV heads (default kv-groups)")
    p.add_argument("--min-layer-keep", type=float, default=0.1,
                   help="--per-layer floor: every layer keeps at least this fraction of its units, and at least one "
                        "(default 0.1)")
    p.add_argument("--multiple-of", type=int, default=64, metavar="M",
                   help="make every final MLP width a multiple of M: llama.cpp quantizes in blocks of 32 (q8_0) or "
                        "256 (k-quants) and matrix kernels tile by 64 or more, so other widths run slower or "
                        "quantize worse; per-layer keeps the total within M/2 of the target (default 64; 1 for "
                        "exact targets, 256 for k-quant GGUF exports)")
    add_calib(p)
    add_output(p)
    add_scale(p)
    p.set_defaults(func=cmd_width)


def cmd_width(args: argparse.Namespace) -> int:
    """Calibrate, prune, save (in memory or layer-streamed, one process or under torchrun); prints a JSON
    summary on rank 0."""
    from prunekit.errors import PlanError
    from prunekit.jobs import width_job

    if args.mlp_keep is None and args.heads_keep is None:
        raise PlanError("nothing to prune: give --mlp-keep, --heads-keep, or both")
    result = width_job(args.model, args.out, mlp_keep=args.mlp_keep, heads_keep=args.heads_keep, mode=args.mode,
                       shots=args.shots, scorer=args.scorer, head_mode=args.head_mode,
                       min_layer_keep=args.min_layer_keep, multiple_of=args.multiple_of, calib=args.calib,
                       samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype,
                       device=args.device, stream=args.stream, offload_dir=args.offload_dir,
                       use_cache=not args.no_cache, force=args.force, progress=progress(args))
    if result is None:  # not rank 0 of a torchrun job
        return 0
    plan, streamed = result
    return emit({
        "out": str(args.out),
        "method": plan.method,
        "streamed": streamed,
        "parameters_before": plan.options["parameters_before"],
        "parameters_after": plan.options["parameters_after"],
        # Heterogeneous = layers of different widths, saved with prunekit's loader (see io/checkpoint.py).
        "heterogeneous": bool(json.loads((Path(args.out) / "config.json").read_text()).get("prunekit")),
        # One short line per layer: the widths it ended with.
        "widths": {k: " ".join(f"{n}={v}" for n, v in w.items())
                   for k, w in (plan.history[-1]["widths"] if plan.history else {}).items()},
    })
