"""Shared pieces of the command line: the parser class (one-line errors), option groups that several
commands take, value parsers, and the output convention.

Output convention: every command writes its results to the files it was given (`--json`, `--out`) and
prints ONE JSON object on stdout summarising what it did (tables and progress go to stderr), so scripts can
read stdout and people can read stderr. Library code never sees the argparse namespace: each handler unpacks
it and calls a typed function.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any, NoReturn

from prunekit.errors import OptionError
from prunekit.options import REQUIRED, Options, parse_keep, positive_int, positive_ints

__all__ = ["Parser", "add_options", "emit", "options_from_args", "parse_keep", "positive_int", "positive_ints", "run_one",
           "say"]


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error raised as an `OptionError` so that `main` reports it like every other
    error of prunekit: one line, exit code 2 (`--help` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        raise OptionError(f"{self.prog.removeprefix('prunekit').strip() or 'usage'}: {message}")


# --- value parsers (argparse `type=`): a bad value is a usage error, before anything is loaded -------------------
def csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# --- option groups ------------------------------------------------------------------------------------------------
def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", help="weights dtype for loading and computing (default float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")


def add_output(p: argparse.ArgumentParser, *, help: str = "output checkpoint directory") -> None:
    p.add_argument("--out", required=True, help=help)
    add_force(p, "--out")


def add_json(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--json", required=required, default=None,
                   help="output JSON path" if required else "also write the results as JSON here")
    add_force(p, "--json")


def add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} if it exists")


def add_tasks(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=None,
                   help="comma-separated zero-shot tasks run through lm-eval on the in-memory model "
                        "(built-in: mmlu; or names of YAMLs in --task-dir)")
    p.add_argument("--task-dir", default=None,
                   help="folder of your own lm-eval task YAMLs (see prunekit.evaluation.zeroshot for local JSONL tasks)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="at most this many examples per task (quick runs)")
    p.add_argument("--seed", type=int, default=1234, help="seed for lm-eval and the benchmark inputs (default 1234)")


def add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=positive_ints, default=(128, 512, 1024),
                   help="comma-separated context lengths to measure (default 128,512,1024)")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="tokens decoded per measurement (default 32)")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences per batch (default 1)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed repeats after one warm-up; median reported (default 3)")


# --- flags from the typed options (`prunekit.options`) --------------------------------------------------------------
def add_options(p: argparse.ArgumentParser, cls: type[Options]) -> None:
    """One argparse argument per field of `cls`, from the field's metadata: the options are the single source
    of the flags, their defaults and their help."""
    for f in fields(cls):
        meta = f.metadata["opt"]
        kind, flag, name = meta["kind"], meta["flag"] or "--" + f.name.replace("_", "-"), f.name
        if kind == "positional":
            p.add_argument(name, help=meta["help"])
        elif kind == "store_true":
            p.add_argument(flag, dest=name, action="store_true", help=meta["help"])
        elif kind == "store_false":
            p.add_argument(flag, dest=name, action="store_false", help=meta["help"])
        elif kind == "optional_bool":
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=f.default,
                           help=meta["help"])
        elif kind == "choice_flags":
            group = p.add_mutually_exclusive_group()
            for choice_flag, (value, help) in meta["flags"].items():
                group.add_argument(choice_flag, dest=name, action="store_const", const=value, help=help)
            p.set_defaults(**{name: f.default})
        else:
            required = f.default is REQUIRED
            p.add_argument(flag, dest=name, type=meta["parse"], choices=meta["choices"], metavar=meta["metavar"],
                           required=required, default=None if required else f.default, help=meta["help"])


def options_from_args(cls: type[Options], args: argparse.Namespace) -> Options:
    """The typed options of a parsed command line (validated: one `OptionError` per bad field)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def run_one(cls: type[Options], args: argparse.Namespace, out: str) -> int:
    """A command as a one-stage recipe: its typed options, checked, then the stage; prints its summary (rank 0)."""
    from prunekit.jobs.recipe import one_stage, run_recipe

    (summary,) = run_recipe(one_stage(options_from_args(cls, args)), out, force=args.force, progress=progress(args))
    return 0 if summary is None else emit(summary)


def progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


# --- outputs --------------------------------------------------------------------------------------------------------
def emit(summary: dict[str, Any]) -> int:
    """Print a command's JSON summary on stdout (the output convention); returns the exit code 0."""
    print(json.dumps(summary, indent=2))
    return 0


def say(text: str) -> None:
    """Human-readable output (tables, reports): stderr, so stdout stays one JSON object."""
    print(text, file=sys.stderr)
