"""Outputs written all or nothing: a checkpoint folder or a file is built under a hidden temporary sibling and
renamed into place only when complete.

Temporary siblings are named `.<name>.tmp-<pid>-<random>` (and `.<name>.old-<pid>-<random>` while an
existing output is being replaced), so a later run can tell its own from those a killed process left
behind: SIGINT and SIGTERM are turned into `KeyboardInterrupt` by the CLI and clean up on the way out, and
what a SIGKILL leaves is removed by the next run that writes the same output (`prepare_output`), once the
process that made it is gone. Outputs get the user's umask (temporary files and folders are created 0600 /
0700).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prunekit.errors import CheckpointError, StorageError

_STALE = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)-")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (a temporary file's creator still running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_siblings(out: Path) -> list[Path]:
    """Remove the temporary siblings of `out` whose process is gone (a SIGKILL'ed run); returns them."""
    removed = []
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _STALE.match(p.name)
        if m and m.group("name") == out.name and not process_alive(int(m.group("pid"))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_writable(folder: Path, what: str) -> None:
    """Fail now, not after the work, when nothing can be created in `folder` (created if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkstemp(prefix=f".prunekit-write-test-{os.getpid()}-", dir=folder)[1])
        probe.unlink()
    except OSError as e:
        raise StorageError(f"{what} {folder} cannot be written: {e.strerror or e}") from e


def prepare_output(out: str | Path, force: bool, *, kind: str = "dir") -> Path:
    """Check, before any work, that `out` may be written: it does not exist (or `force`), it is of the right
    kind, and its folder is writable; stale temporary siblings of earlier killed runs are removed."""
    out = Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"{out} exists; pass --force (force=True) to replace it")
    if out.exists() and (out.is_dir() != (kind == "dir")):
        raise CheckpointError(f"{out} exists and is not a {'directory' if kind == 'dir' else 'file'}")
    check_writable(out.parent if str(out.parent) else Path("."), "the output folder")
    remove_stale_siblings(out)
    return out


def _temp_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}-"


def commit_dir(tmp: Path, out: Path) -> None:
    """Move a completed temporary directory into place (mode from the umask); an existing `out` is replaced
    only now."""
    os.chmod(tmp, 0o777 & ~_umask())
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "old"), dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """A temporary sibling folder to write into; renamed to `out` when the block completes, removed when it
    raises (KeyboardInterrupt included)."""
    out = prepare_output(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent))
    try:
        yield tmp
        commit_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: str | Path, force: bool = False) -> Iterator[Path]:
    """A temporary sibling path to write one file to; renamed to `out` when the block completes (mode from
    the umask), removed when it raises."""
    out = prepare_output(out, force, kind="file")
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(data: Any, path: str | Path) -> Path:
    """Write JSON all or nothing (temporary sibling, then rename), with the user's umask for the file mode."""
    path = prepare_output(path, True, kind="file")
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
