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
from pathlib import Path
from typing import Any, NoReturn

from prunekit.errors import OptionError
from prunekit.io.outputs import Target, input_paths, prepare_output, write_json

__all__ = ["Parser", "check_json_output", "emit", "say", "write_json"]

MODEL_HELP = "built-in name (smollm2-135m, gemma3-270m), local HF checkpoint directory, or hub id"
TEXT_HELP = "built-in corpus (wiki, c4, tiny, code, technical, multilingual), or a local .txt/.jsonl file"


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error raised as an `OptionError` so that `main` reports it like every other
    error of prunekit: one line, exit code 2 (`--help` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        raise OptionError(f"{self.prog.removeprefix('prunekit').strip() or 'usage'}: {message}")


# --- value parsers (argparse `type=`): a bad value is a usage error, before anything is loaded -------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def positive_ints(value: str) -> tuple[int, ...]:
    out = tuple(positive_int(v) for v in csv(value))
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {value!r}")
    return out


def parse_keep(text: str) -> float | int:
    """A keep target: a value containing '.' or at most 1 is a ratio (float), otherwise a count (int)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio like 0.75 or a count like 96, got {text!r}") from None
    if "." in text or value <= 1:
        return value
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"a count must be a whole number, got {text!r}")
    return int(value)


# --- option groups ------------------------------------------------------------------------------------------------
def add_model(p: argparse.ArgumentParser, *, help: str = MODEL_HELP) -> None:
    p.add_argument("model", help=help)
    add_device(p)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", help="weights dtype for loading and computing (default float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")


def add_calib(p: argparse.ArgumentParser, *, flag: str = "--calib", default: str = "c4", samples: int | None = 16,
              what: str = "calibration", text_help: str | None = None) -> None:
    """Text options; `samples=None` leaves the number of sequences to the job (heal: as many as it reads)."""
    p.add_argument(flag, default=default,
                   help=text_help or f"{what} text: {TEXT_HELP}; or several, mixed by weight, e.g. "
                                     f"c4:2,technical:1 (default {default}; first halves only)")
    p.add_argument("--samples", type=positive_int, default=samples,
                   help=f"number of {what} sequences (default "
                        f"{samples if samples is not None else 'steps x batch size: each read once'})")
    p.add_argument("--seq-len", type=positive_int, default=512, help=f"tokens per {what} sequence (default 512)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="sequences per forward pass (default 4)")


def add_output(p: argparse.ArgumentParser, *, help: str = "output checkpoint directory") -> None:
    p.add_argument("--out", required=True, help=help)
    add_force(p, "--out")


def add_json(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--json", required=required, default=None,
                   help="output JSON path" if required else "also write the results as JSON here")
    add_force(p, "--json")


def add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} if it exists")


def add_scale(p: argparse.ArgumentParser) -> None:
    """Options for models larger than memory (layer streaming) and the score cache."""
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="load one decoder layer at a time from the safetensors files (--no-stream: whole model "
                        "in memory; default: stream only when the model would not fit in free memory)")
    p.add_argument("--offload-dir", default=None,
                   help="directory for the calibration hidden states of a streamed run (default: score and drop "
                        "keep them in the cache directory so an interrupted run resumes, or in RAM with --no-cache; "
                        "width keeps them in RAM)")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the score cache ($PRUNEKIT_CACHE/scores: similarity sums, and "
                        "width statistics per shot), no resuming")


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


def progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


# --- outputs --------------------------------------------------------------------------------------------------------
def check_json_output(args: argparse.Namespace, *inputs: str | Path | None) -> Target:
    """`--json`, checked now, not after the work: not an existing file without `--force`, not a directory, not
    an input of the run (`inputs`: the model, text files), and in a folder that can be written."""
    return prepare_output(args.json, args.force, kind="file", inputs=input_paths(*inputs))


def emit(summary: dict[str, Any]) -> int:
    """Print a command's JSON summary on stdout (the output convention); returns the exit code 0."""
    print(json.dumps(summary, indent=2))
    return 0


def say(text: str) -> None:
    """Human-readable output (tables, reports): stderr, so stdout stays one JSON object."""
    print(text, file=sys.stderr)
