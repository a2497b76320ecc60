"""`prunekit score` and `prunekit drop`: LLM-Drop similarity scores, and layer dropping to a checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from prunekit.cli.options import (
    add_calib,
    add_json,
    add_model,
    add_output,
    add_scale,
    check_json_output,
    emit,
    positive_int,
    progress,
)

TARGET_NAMES = ("attn", "mlp", "block", "joint")  # spelled out so that building the parser needs no torch


def register(sub: Any) -> None:
    p = sub.add_parser("score", help="LLM-Drop similarity scores of every layer (block, attention, MLP)",
                       description="One calibration pass; for every layer, the mean cosine similarity of the "
                                   "residual stream before/after the block, the attention and the MLP.")
    add_model(p)
    add_calib(p)
    add_scale(p)
    add_json(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("drop", help="drop the most redundant attention/MLP/blocks and save a smaller checkpoint",
                       description="LLM-Drop: score, drop the n most redundant modules, save the smaller model "
                                   "with its tokenizer and prunekit_plan.json.")
    add_model(p)
    p.add_argument("--target", required=True, choices=TARGET_NAMES,
                   help="attn: Attention Drop; mlp: MLP Drop; block: Block Drop; joint: attention and MLP "
                        "modules ranked together")
    p.add_argument("--n", type=int, required=True, help="number of modules (layers, for block) to drop")
    p.add_argument("--consecutive", action="store_true",
                   help="Block Drop of the best consecutive run of n blocks (by cos(h_i, h_{i+n}))")
    p.add_argument("--iterative", action="store_true",
                   help="drop one module at a time and re-score the layers after it (default: one-shot)")
    p.add_argument("--criterion", choices=("cosine", "loss", "kl"), default="cosine",
                   help="cosine: LLM-Drop, the most redundant modules by cosine similarity (default); loss: module by "
                        "module, the one whose removal raises the calibration loss least, among the --prefilter "
                        "most redundant by cosine (in memory or streamed); kl: the same, by the KL divergence from the dense "
                        "model's next-token distributions")
    p.add_argument("--prefilter", type=positive_int, default=8,
                   help="--criterion loss/kl: candidates tried per step, the most redundant by cosine (default 8)")
    p.add_argument("--repair", choices=("none", "linear"), default="none",
                   help="linear: fold a training-free linear map into the projection before each removed span, "
                        "estimated on the calibration text and kept only where it lowers the loss on held-out "
                        "calibration samples (Llama/Mistral/Qwen; in memory or streamed) (default none)")
    add_calib(p)
    add_output(p)
    add_scale(p)
    p.set_defaults(func=cmd_drop)


def cmd_score(args: argparse.Namespace) -> int:
    from prunekit.cli.options import write_json
    from prunekit.jobs import score_job

    dest = check_json_output(args, args.model, args.calib)
    # In memory or layer-streamed, one process or several under torchrun (rank 0 writes).
    result = score_job(str(args.model), calib=args.calib, samples=args.samples, seq_len=args.seq_len,
                       batch_size=args.batch_size, dtype=args.dtype, device=args.device, stream=args.stream,
                       offload_dir=args.offload_dir, use_cache=not args.no_cache, progress=progress(args))
    if result is None:
        return 0
    out = result.scores.to_json()
    out["model"] = result.model_info
    write_json(out, dest)
    return emit({"json": str(args.json), "layers": result.scores.num_layers, "streamed": result.streamed,
                 "cache_hit": result.cache_hit})


def cmd_drop(args: argparse.Namespace) -> int:
    from prunekit.jobs import drop_job

    # Fails on an existing --out before any expensive work; rank 0 saves under torchrun.
    plan = drop_job(str(args.model), args.out, target=args.target, n=args.n, consecutive=args.consecutive,
                    iterative=args.iterative, calib=args.calib, samples=args.samples, seq_len=args.seq_len,
                    batch_size=args.batch_size, dtype=args.dtype, device=args.device, stream=args.stream,
                    offload_dir=args.offload_dir, use_cache=not args.no_cache, force=args.force,
                    repair=args.repair, criterion=args.criterion, prefilter=args.prefilter,
                    progress=progress(args))
    if plan is None:
        return 0
    summary: dict[str, Any] = {"out": str(args.out), "method": plan.method,
                               "dropped": [f"{d.module}@{d.layer}" for d in plan.dropped]}
    if plan.repair:
        summary["repair"] = {k: plan.repair[k] for k in ("check_loss_unrepaired", "check_loss")}
        summary["repair"]["applied"] = sum(s["applied"] for s in plan.repair["spans"])
    return emit(summary)
