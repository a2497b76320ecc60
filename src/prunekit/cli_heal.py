"""`prunekit heal`: recovery fine-tuning of a (pruned) checkpoint; the result keeps its structure and plan.

Only this module sees the argparse namespace; it unpacks it and calls `prunekit.recovery.heal_checkpoint`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

_MODEL_HELP = "pruned checkpoint directory (any local HF checkpoint, built-in name or hub id also works)"
_TEXT_HELP = "built-in corpus (wiki, c4, tiny, code, technical, multilingual), or a local .txt/.jsonl file"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "heal",
        help="recovery fine-tuning: a short causal-LM training run after pruning (structure unchanged)",
        description="Train every remaining parameter of MODEL for --steps AdamW steps on the first half of TEXT "
                    "(evaluation uses the second half), with linear warm-up and cosine decay, and save the "
                    "result with the original plan plus a record of the run (settings, data hash, losses).",
    )
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--text", default="c4", help=f"training text: {_TEXT_HELP} (default c4; its first half is used)")
    p.add_argument("--samples", type=int, default=64, help="training sequences drawn from the text (default 64)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per optimizer step (default 4)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent warming up (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order (default 0)")
    p.add_argument("--dtype", default="float32", help="dtype to train in (default float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from prunekit.recovery import heal_checkpoint

    rec = heal_checkpoint(args.model, args.out, text=args.text, samples=args.samples, seq_len=args.seq_len,
                          batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup=args.warmup,
                          weight_decay=args.weight_decay, seed=args.seed, dtype=args.dtype, device=args.device,
                          force=args.force, progress=not getattr(args, "quiet", False))
    summary = {k: rec[k] for k in ("steps", "lr", "tokens_seen", "loss_first", "loss_last_10pct_mean", "seconds")}
    print(json.dumps({"out": str(args.out), **summary}, indent=2))
    return 0
