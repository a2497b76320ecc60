"""`prunekit heal`: recovery fine-tuning of a (pruned) checkpoint; the result keeps its structure and plan."""

from __future__ import annotations

import argparse
from typing import Any

from prunekit.cli.options import add_calib, add_model, add_output, emit, progress


def register(sub: Any) -> None:
    p = sub.add_parser(
        "heal",
        help="recovery fine-tuning: a short causal-LM training run after pruning (structure unchanged)",
        description="Train every remaining parameter of MODEL for --steps AdamW steps on the first half of TEXT "
                    "(evaluation uses the second half), with linear warm-up and cosine decay, and save the "
                    "result with the original plan plus a record of the run (settings, data hash, losses).",
    )
    add_model(p, help="pruned checkpoint directory (any local HF checkpoint, built-in name or hub id also works)")
    add_calib(p, flag="--text", samples=64, what="training")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent warming up (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order (default 0)")
    add_output(p)
    p.set_defaults(func=cmd_heal)


def cmd_heal(args: argparse.Namespace) -> int:
    from prunekit.jobs import heal_checkpoint

    rec = heal_checkpoint(args.model, args.out, text=args.text, samples=args.samples, seq_len=args.seq_len,
                          batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup=args.warmup,
                          weight_decay=args.weight_decay, seed=args.seed, dtype=args.dtype, device=args.device,
                          force=args.force, progress=progress(args))
    summary = {k: rec[k] for k in ("steps", "lr", "tokens_seen", "loss_first", "loss_last_10pct_mean", "seconds")}
    return emit({"out": str(args.out), **summary})
