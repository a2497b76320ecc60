"""`prunekit heal`: recovery fine-tuning of a (pruned) checkpoint; the result keeps its structure and plan."""

from __future__ import annotations

import argparse
from typing import Any

from prunekit.cli.options import add_options, add_output, run_one
from prunekit.options import HealOptions


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
    add_options(p, HealOptions)
    add_output(p)
    p.set_defaults(func=cmd_heal)


def cmd_heal(args: argparse.Namespace) -> int:
    return run_one(HealOptions, args, args.out)
