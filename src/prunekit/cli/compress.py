"""`prunekit compress`: the best model for a budget, depth and width searched together."""

from __future__ import annotations

import argparse
from typing import Any

from prunekit.cli.options import add_options, add_output, run_one
from prunekit.options import CompressOptions


def register(sub: Any) -> None:
    p = sub.add_parser(
        "compress",
        help="search depth (attention/MLP/block drops) and width (MLP channels, KV groups) together for a "
             "parameter or KV-cache budget and save the best model, with a Pareto table and plot",
        description="Estimate from one forward+backward pass over calibration text how much the loss rises for "
                    "every way of narrowing or removing each attention and MLP sub-layer (with a least-squares "
                    "refit of what remains), spend the budget where it costs least, try several candidate "
                    "families (mixed, depth only, width only, uniform width, and mixed in several rounds), score "
                    "each by the loss on held-out calibration samples, refit the best one's projections against "
                    "the dense model's residual stream, and save it. Training-free; a model "
                    "that does not fit in memory is streamed one layer at a time (the backward pass too).",
    )
    add_options(p, CompressOptions)
    add_output(p)
    p.set_defaults(func=cmd_compress)


def cmd_compress(args: argparse.Namespace) -> int:
    return run_one(CompressOptions, args, args.out)
