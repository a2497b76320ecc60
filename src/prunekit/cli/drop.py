"""`prunekit score` and `prunekit drop`: LLM-Drop similarity scores, and layer dropping to a checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from prunekit.cli.options import add_json, add_options, add_output, run_one
from prunekit.options import DropOptions, ScoreOptions


def register(sub: Any) -> None:
    p = sub.add_parser("score", help="LLM-Drop similarity scores of every layer (block, attention, MLP)",
                       description="One calibration pass; for every layer, the mean cosine similarity of the "
                                   "residual stream before/after the block, the attention and the MLP.")
    add_options(p, ScoreOptions)
    add_json(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("drop", help="drop the most redundant attention/MLP/blocks and save a smaller checkpoint",
                       description="LLM-Drop: score, drop the n most redundant modules, save the smaller model "
                                   "with its tokenizer, prunekit_plan.json and prunekit_recipe.yaml.")
    add_options(p, DropOptions)
    add_output(p)
    p.set_defaults(func=cmd_drop)


def cmd_score(args: argparse.Namespace) -> int:
    # In memory or layer-streamed, one process or several under torchrun (rank 0 writes).
    return run_one(ScoreOptions, args, args.json)


def cmd_drop(args: argparse.Namespace) -> int:
    # Fails on an existing --out before any expensive work; rank 0 saves under torchrun.
    return run_one(DropOptions, args, args.out)
