"""`prunekit width`: TransAct width pruning (attention heads and MLP channels) to a smaller dense checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from prunekit.cli.options import add_options, add_output, run_one
from prunekit.options import WidthOptions, choices_of

# A test holds these equal to `prunekit.width.SCORERS` and `HEAD_MODES` (the options import no torch).
SCORER_NAMES = choices_of(WidthOptions, "scorer")
HEAD_MODE_NAMES = choices_of(WidthOptions, "head_mode")


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
    add_options(p, WidthOptions)
    add_output(p)
    p.set_defaults(func=cmd_width)


def cmd_width(args: argparse.Namespace) -> int:
    """Calibrate, prune, save (in memory or layer-streamed, one process or under torchrun); prints a JSON
    summary on rank 0."""
    return run_one(WidthOptions, args, args.out)
