"""`prunekit heal`: recovery fine-tuning of a (pruned) checkpoint; the result keeps its structure and plan."""

from __future__ import annotations

import argparse
from typing import Any

from prunekit.cli.options import add_calib, add_model, add_output, emit, positive_int, progress


def register(sub: Any) -> None:
    p = sub.add_parser(
        "heal",
        help="recovery after pruning: fine-tuning or distillation from --teacher, full or --lora (structure unchanged)",
        description="Train MODEL for --steps AdamW steps on the first half of TEXT (evaluation uses the second "
                    "half), with linear warm-up and cosine decay: causal-LM loss, or with --teacher the KL to the "
                    "teacher's next-token distributions (optionally mixed with the causal-LM loss by --alpha); every "
                    "remaining parameter, or rank --lora LoRA matrices merged back before saving. The result is "
                    "saved with the original plan plus a record of the run (recipe, data hashes, every loss).",
    )
    add_model(p, help="pruned checkpoint directory (any local HF checkpoint, built-in name or hub id also works)")
    add_calib(p, flag="--text", default="mix", samples=None, what="training", text_help=(
        "training text: SOURCE[:WEIGHT],... mixed by weight (e.g. c4:0.7,wiki:0.3; the --samples windows are shared "
        "by weight), mix for every built-in text weighted by size, and teacher:N for N tokens sampled from "
        "--teacher; only the first half of each text is used (default mix)"))
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", default=None,
                   help="teacher model (normally the dense model MODEL was pruned from): distil from it; it must "
                        "have the same tokenizer and vocabulary")
    g.add_argument("--alpha", type=float, default=None,
                   help="weight of the causal-LM loss mixed with the distillation loss (default 0.5 with --teacher; "
                        "0 for pure distillation)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="distillation temperature T; the KL is scaled by T^2 (default 1)")
    g.add_argument("--teacher-topk", type=positive_int, default=None,
                   help="use only the teacher's top-K logits per position, renormalised (saves memory)")
    g.add_argument("--teacher-cache", action="store_true",
                   help="run the teacher alone first and keep its top-K logits on disk (K from --teacher-topk, "
                        "default 64), so teacher and student never share memory (for teachers that do not fit "
                        "beside the student)")
    g.add_argument("--hidden-weight", type=float, default=0.0,
                   help="also match the residual stream after every layer to the teacher's (relative squared "
                        "error) with this weight; needs as many layers as the teacher (default 0: logits only)")
    g.add_argument("--gen-temperature", type=float, default=1.0,
                   help="sampling temperature of teacher:N text, 0 for greedy (default 1)")
    g.add_argument("--prompt-text", default="c4",
                   help="text whose first half gives the 16-token prompts of teacher:N (default c4)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the teacher-text cache")
    p.add_argument("--lora", type=int, default=None,
                   help="train rank-R LoRA matrices on the attention/MLP projections instead of every parameter, "
                        "merged into the weights before saving")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent warming up (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order (default 0)")
    p.add_argument("--save-every", type=int, default=0,
                   help="every N steps, keep resumable training state in OUT.heal-state/; running the same "
                        "command again continues from it (default 0: never)")
    add_output(p)
    p.set_defaults(func=cmd_heal)


def cmd_heal(args: argparse.Namespace) -> int:
    from prunekit.jobs import heal_checkpoint
    from prunekit.recovery import DEFAULT_LR

    lr = DEFAULT_LR if args.lr is None else args.lr
    rec = heal_checkpoint(args.model, args.out, text=args.text, samples=args.samples, seq_len=args.seq_len,
                          batch_size=args.batch_size, steps=args.steps, lr=lr, warmup=args.warmup,
                          weight_decay=args.weight_decay, seed=args.seed, teacher=args.teacher, alpha=args.alpha,
                          temperature=args.temperature, teacher_topk=args.teacher_topk, lora=args.lora,
                          hidden_weight=args.hidden_weight,
                          gen_temperature=args.gen_temperature, prompt_text=args.prompt_text,
                          use_cache=not args.no_cache, teacher_cache=args.teacher_cache,
                          save_every=args.save_every, dtype=args.dtype, device=args.device, force=args.force,
                          progress=progress(args))
    summary = {k: rec[k] for k in ("method", "steps", "lr", "tokens_seen", "loss_first", "loss_last_10pct_mean",
                                   "seconds")}
    return emit({"out": str(args.out), **summary})
