"""`prunekit run RECIPE.yaml [--out DIR]`: run a recipe's stages (`prunekit.jobs.recipe`)."""

from __future__ import annotations

import argparse
from typing import Any

from prunekit.cli.options import add_force, emit, progress


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run a recipe: stages such as compress, heal, export, each with its options "
                                   "(every output folder keeps the recipe that made it: prunekit_recipe.yaml)",
                       description="Run the stages of a recipe YAML in order. A stage's model defaults to the "
                                   "checkpoint the previous stage wrote; `prunekit run OUT/prunekit_recipe.yaml "
                                   "--out OTHER` makes OUT's model again.")
    p.add_argument("recipe", help="recipe YAML (e.g. a checkpoint's prunekit_recipe.yaml)")
    p.add_argument("--out", default=None, help="where the last stage writes (overrides the recipe's own)")
    add_force(p, "the outputs")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from prunekit.jobs.recipe import Recipe, run_recipe

    summaries = run_recipe(Recipe.load(args.recipe), args.out, force=args.force, progress=progress(args))
    if summaries and summaries[-1] is None:  # not rank 0 of a torchrun job
        return 0
    return emit({"recipe": str(args.recipe), "stages": summaries})
