"""Recipes: a list of stages (compress, then heal, then export, ...), each a command with its typed options,
written as YAML and kept in every folder a stage writes (`prunekit_recipe.yaml`), so anyone can see how a
model was made and `prunekit run OUT/prunekit_recipe.yaml --out OTHER` makes it again, bit for bit on the
same machine and dtype. Every CLI command is a one-stage recipe.

    stages:
    - command: compress
      options: {model: smollm2-135m, budget: params=0.8}
    - command: heal
      options: {steps: 100}            # model: the previous stage's checkpoint
    - command: export
      options: {format: gguf}
      out: smollm2-p08.gguf            # where this stage writes; `--out` overrides the last stage's

A stage's `model` defaults to `@previous`, the checkpoint the last checkpoint-writing stage made. A stage
without `out` other than the last writes into a scratch folder beside the final output, removed at the end.
Every stage's options are validated, and every output checked, before the first stage starts.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from prunekit import __version__
from prunekit.errors import OptionError
from prunekit.io.outputs import input_paths, prepare_output, scratch_dir, sibling_scratch
from prunekit.jobs.dist import DistEnv
from prunekit.jobs.stages import STAGES, Summary
from prunekit.options import Options
from prunekit.plans import RECIPE_FILE

PREVIOUS = "@previous"


@dataclass(frozen=True)
class Stage:
    command: str
    options: Options
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"command": self.command, "options": self.options.to_dict()}
        return data if self.out is None else {**data, "out": self.out}


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]

    def to_yaml(self) -> str:
        head = ("# prunekit recipe: `prunekit run THIS_FILE --out DIR` makes this model again (see "
                "prunekit.jobs.recipe)\n")
        body = {"prunekit_version": __version__, "stages": [s.to_dict() for s in self.stages]}
        return head + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)

    @classmethod
    def from_data(cls, data: Any, where: str) -> "Recipe":
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
            raise OptionError(f"{where}: a recipe is a mapping with a non-empty list of `stages`")
        unknown = sorted(set(data) - {"stages", "prunekit_version"})
        if unknown:
            raise OptionError(f"{where}: unknown recipe key {unknown[0]!r}")
        return cls(tuple(_stage(s, i, where) for i, s in enumerate(data["stages"])))

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise OptionError(f"cannot read recipe {path}: {' '.join(str(e).split())}") from e
        return cls.from_data(data, str(path))


def _stage(data: Any, i: int, where: str) -> Stage:
    at = f"{where}: stage {i + 1}"
    if not isinstance(data, dict) or "command" not in data:
        raise OptionError(f"{at} must be a mapping with a `command`")
    unknown = sorted(set(data) - {"command", "options", "out"})
    if unknown:
        raise OptionError(f"{at}: unknown key {unknown[0]!r} (a stage has command, options and out)")
    kind = STAGES.get(data["command"])
    if kind is None:
        raise OptionError(f"{at}: unknown command {data['command']!r}; choose one of {', '.join(STAGES)}")
    options = dict(data.get("options") or {})
    if i > 0:
        options.setdefault("model", PREVIOUS)
    elif options.get("model") == PREVIOUS:
        raise OptionError(f"{at}: the first stage has no previous stage to start from")
    out = data.get("out")
    if out is not None and (not isinstance(out, str) or not out.strip()):
        raise OptionError(f"{at}: out must be a path")
    return Stage(data["command"], kind.options.from_dict(options, where=f"{at} ({data['command']})"), out)


def one_stage(options: Options) -> Recipe:
    return Recipe((Stage(type(options).command, options),))


def run_recipe(recipe: Recipe, out: str | Path | None = None, *, force: bool = False,
               progress: bool = True) -> list[Summary | None]:
    """Run every stage in order; returns each stage's summary (None on ranks other than 0 under torchrun)."""
    last = recipe.stages[-1]
    final_out = str(out) if out is not None else last.out
    kinds = [STAGES[s.command] for s in recipe.stages]
    if final_out is None and kinds[-1].output != "json?":
        raise OptionError("the last stage has no output: give --out (or `out:` in the recipe's last stage)")
    _check_chain(recipe)
    if len(recipe.stages) > 1 and DistEnv.from_env().is_distributed:
        # Each stage is its own process group and only rank 0 writes, so a later stage on another rank
        # would not find the checkpoint it starts from.
        raise OptionError("a recipe of several stages runs in one process; under torchrun run one stage per "
                          "command (prunekit drop/width/compress ..., or a one-stage recipe)")
    final = None if final_out is None else prepare_output(final_out, force, kind=kinds[-1].output_kind(last.options),
                                                           inputs=_inputs(last.options))
    given = {i: prepare_output(s.out, force, kind=kinds[i].output_kind(s.options), inputs=_inputs(s.options))
             for i, s in enumerate(recipe.stages[:-1]) if s.out is not None}
    summaries: list[Summary | None] = []
    with ExitStack() as stack:
        scratch: Path | None = None
        previous: str | None = None
        for i, (stage, kind) in enumerate(zip(recipe.stages, kinds)):
            opts = stage.options
            if opts.model == PREVIOUS:  # type: ignore[attr-defined]
                opts = opts.replace(model=previous)
            if i == len(recipe.stages) - 1:
                dest = final
            elif i in given:
                dest = given[i]
            else:
                if scratch is None:
                    scratch = stack.enter_context(sibling_scratch(final.path) if final else scratch_dir("recipe"))
                dest = prepare_output(scratch / f"stage-{i + 1}-{stage.command}", kind=kind.output_kind(opts))
            if kind.output == "checkpoint":
                saved = Recipe(tuple(_as_recorded(s) for s in recipe.stages[:i + 1]))
                dest = replace(dest, companions=((RECIPE_FILE, saved.to_yaml()),))
                previous = str(dest.path)
            summaries.append(kind.run(opts, dest, progress))
    return summaries


def _check_chain(recipe: Recipe) -> None:
    """A stage that starts from the previous checkpoint needs a checkpoint-writing stage before it."""
    seen_checkpoint = False
    for i, s in enumerate(recipe.stages):
        if s.options.model == PREVIOUS and not seen_checkpoint:  # type: ignore[attr-defined]
            raise OptionError(f"stage {i + 1} ({s.command}) starts from the previous checkpoint, but no stage before "
                              "it writes one")
        seen_checkpoint |= STAGES[s.command].output == "checkpoint"


def _inputs(opts: Options) -> list[Path]:
    return input_paths(*[s for s in opts.input_specs() if s != PREVIOUS])


def _as_recorded(stage: Stage) -> Stage:
    """A stage as a saved recipe holds it: the options in full, a local model by its absolute path (the recipe
    travels with the output, away from the directory it was run in), without where it happened to write."""
    opts = stage.options
    model = opts.model  # type: ignore[attr-defined]
    if model != PREVIOUS and Path(model).expanduser().exists():
        opts = opts.replace(model=str(Path(model).expanduser().resolve()))
    return Stage(stage.command, opts)
