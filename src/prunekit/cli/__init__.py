"""Command line: `prunekit {score,drop,width,compress,heal,eval,bench,compare,export,run,demo} ...` (also `python -m prunekit`).

One parser with shared option groups (`options`), one module per family of commands, one handler
convention (`cmd_<name>(args) -> int`, registered by each module's `register`), one output convention (one
JSON summary on stdout; tables and progress on stderr). Command names, options and the JSON files they
write are a contract that other tools read. Handlers import the library lazily so that `--help` does not
load torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Callable

from prunekit.cli import compress, demo, drop, evaluate, export, heal, run, width
from prunekit.cli.options import Parser
from prunekit.errors import PrunekitError
from prunekit.io.paths import cache_dir as _cache_dir

COMMANDS = (drop, width, compress, heal, evaluate, export, run, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="prunekit",
        description="Structured pruning of Hugging Face causal LMs: LLM-Drop layer dropping and TransAct "
                    "width pruning, with side-by-side measurements.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for module in COMMANDS:
        module.register(sub)
    for p in sub.choices.values():  # `prunekit width ... --quiet` as well as `prunekit -q width ...`
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars (same as the global -q)")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, `timeout` and CI cancellation send), raised like Ctrl-C so that every `finally`
    on the way out removes its temporary files."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(e: BaseException) -> str:
    """An error message on one line (wrapped library messages can span several)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


_OOM_WORDS = ("out of memory", "not enough memory", "cannot allocate memory", "can't allocate memory",
              "unable to mmap", "failed to allocate")


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(w in str(e).lower() for w in _OOM_WORDS)


def _headroom() -> str:
    from prunekit.io.limits import memory_headroom

    return memory_headroom()


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Download retries are reported by the one error line that follows them, not line by line.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # What `datasets` prepares for zero-shot tasks goes to prunekit's cache, not ~/.cache/huggingface (unless the
    # user chose a place). Set before `datasets` is first imported, which reads it once.
    os.environ.setdefault("HF_DATASETS_CACHE", str(_cache_dir() / "datasets"))
    try:
        args = build_parser().parse_args(argv)
        if args.quiet:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # transformers' own bars (loading, converting, saving)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        print(f"prunekit: error: out of memory: {_one_line(e)[:300]} ({_headroom()}); use a machine with more "
              "memory, a smaller --dtype, fewer --samples or a shorter --seq-len, or --stream where the command "
              "has it", file=sys.stderr)
        return 2
    except (PrunekitError, OSError) as e:
        # OSError: the environment, not the input (a path that cannot be written, a full disk). Outputs are
        # committed by rename only when complete, so nothing half-written is left either way.
        print(f"prunekit: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print("prunekit: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
