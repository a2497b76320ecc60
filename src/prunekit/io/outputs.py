"""The one output layer: every file or folder prunekit writes goes through here.

A user's output (a checkpoint, an export, a report, a `--json` file) is a `Target`, checked once before any
work by `prepare_output`:
- it is not, is not inside, and does not contain any input of the run (the model, a teacher, a text file)
  or prunekit's own cache or the Hugging Face cache, so no run can overwrite what it reads;
- it does not exist, unless `force`; its folder can be written (nothing is created by the check);
- what was there is remembered, and the result is published only if the target is still as it was checked:
  a target that another run created (or replaced) meanwhile is refused, never silently replaced.

The result is built under a hidden temporary sibling, `.<name>.tmp-<pid>-<random>` (and an existing output
being replaced moves to `.<name>.old-<pid>-<random>`), and renamed into place only when complete, without
replacing anything that appeared in between (`renameat2(RENAME_NOREPLACE)` where the system has it). Files
and folders get the user's umask. SIGINT and SIGTERM are turned into `KeyboardInterrupt` by the CLI and
clean up on the way out; what a SIGKILL leaves is removed by the next run that writes the same output, once
the process that made it is gone.

prunekit's own files (cache entries, resumable state) are replaced all or nothing by `owned_file` and
`owned_dir`, which skip the user-output checks. Scratch folders come from `scratch_dir`: under the user's
folder when one is given, else under one prunekit folder in the system's temporary directory
(`temp_root`), named so that the next run removes what a killed one left.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from prunekit.errors import CheckpointError, StorageError
from prunekit.faults import pause_point
from prunekit.io.paths import cache_dir, temp_root

Kind = Literal["dir", "file"]
_STALE = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)-")
_SCRATCH = re.compile(r"^prunekit-[a-z]+-(?P<pid>\d+)-")


@dataclass(frozen=True)
class Target(os.PathLike):
    """A user's output, checked: where it goes, whether it may replace what is there, and what was there when
    it was checked (`seen`: None for nothing, else the identity of the file or folder)."""

    path: Path
    kind: Kind
    force: bool
    seen: tuple[int, int, int] | None
    # Small text files published with a folder (file name -> content), e.g. the recipe that made it.
    companions: tuple[tuple[str, str], ...] = ()

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


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


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def remove_dead(folder: Path, pattern: re.Pattern[str], *, name: str | None = None) -> list[Path]:
    """Remove what killed runs left in `folder`: the entries whose name matches `pattern` (its `pid` group
    naming a process that is gone, and its `name` group equal to `name` when one is given); returns them."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = pattern.search(p.name)
        if m and (name is None or m.group("name") == name) and not process_alive(int(m.group("pid"))):
            _remove(p)
            removed.append(p)
    return removed


def remove_stale_siblings(out: Path) -> list[Path]:
    """Remove the temporary siblings of `out` whose process is gone (a SIGKILL'ed run); returns them."""
    return remove_dead(out.parent if str(out.parent) else Path("."), _STALE, name=out.name)


# --- what an output must not touch -----------------------------------------------------------------------------
def protected_paths() -> list[Path]:
    """Folders no output may be, be inside, or contain: prunekit's cache (built-in models, scores) and the
    Hugging Face caches (hub downloads, datasets)."""
    paths = [cache_dir()]
    try:
        from huggingface_hub import constants

        paths += [Path(constants.HF_HUB_CACHE), Path(constants.HF_HOME)]
    except ImportError:  # pragma: no cover - a dependency of transformers
        pass
    return paths


def input_paths(*specs: str | Path | None) -> list[Path]:
    """The local files and folders among a run's inputs: model directories, text files, plan files. A text
    spec of several sources (`c4:2,notes.txt:1`) contributes each local file; names that are not local paths
    (built-in names, hub ids) contribute nothing (the caches they live in are always protected)."""
    out: list[Path] = []
    for spec in specs:
        if spec is None:
            continue
        s = str(spec)
        candidates = [s] + [part.strip().rsplit(":", 1)[0] for part in s.split(",")]
        out += [Path(c).expanduser() for c in dict.fromkeys(candidates) if c and Path(c).expanduser().exists()]
    return out


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p.expanduser()))


def check_not_input(out: Path, inputs: Iterable[str | Path]) -> None:
    """One clear error when `out` is, is inside, or contains an input or a protected folder."""
    o = _real(out)
    for given in [*inputs, *protected_paths()]:
        i = _real(Path(given))
        if o == i:
            raise CheckpointError(f"the output {out} is an input of this run ({given}); choose another output path")
        if i in o.parents:
            raise CheckpointError(f"the output {out} is inside {given}, which this run reads; choose a path "
                                  "outside it")
        if o in i.parents:
            raise CheckpointError(f"the output {out} contains {given}, which this run reads; choose a path that "
                                  "does not contain it")


# --- checking a target ------------------------------------------------------------------------------------------
def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _existing_ancestor(path: Path) -> Path:
    p = _real(path)
    while not p.exists():
        p = p.parent
    return p


def check_writable(folder: Path, what: str, *, create: bool = True) -> None:
    """Fail now, not after the work, when nothing can be created in `folder`. `create`: make it if missing
    (a work folder); otherwise its nearest existing ancestor is probed and nothing is created."""
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe_in = folder if create else _existing_ancestor(folder)
        if not probe_in.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe_in} is not a directory")
        probe = Path(tempfile.mkstemp(prefix=f".prunekit-write-test-{os.getpid()}-", dir=probe_in)[1])
        probe.unlink()
    except OSError as e:
        raise StorageError(f"{what} {folder} cannot be written: {e.strerror or e}") from e


def prepare_output(out: str | Path | Target, force: bool = False, *, kind: Kind = "dir",
                   inputs: Iterable[str | Path] = ()) -> Target:
    """Check, before any work, that `out` may be written (see the module docstring) and return it as a
    `Target` to publish to later. Stale temporary siblings of earlier killed runs are removed. A `Target`
    is returned as it is: it was checked when it was made."""
    if isinstance(out, Target):
        return out
    if not str(out).strip():
        raise CheckpointError("the output path is empty; give a file or folder name")
    path = Path(out).expanduser()
    check_not_input(path, inputs)
    seen = _identity(path)
    if seen is not None and not force:
        raise CheckpointError(f"{path} exists; pass --force (force=True) to replace it")
    if seen is not None and (path.is_dir() != (kind == "dir")):
        raise CheckpointError(f"{path} exists and is not a {'directory' if kind == 'dir' else 'file'}")
    parent = path.parent if str(path.parent) else Path(".")
    check_writable(parent, "the output folder", create=False)
    remove_stale_siblings(path)
    return Target(path, kind, force, seen)


# --- publishing -------------------------------------------------------------------------------------------------
def _renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with `FileExistsError` if `dst` exists, atomically where the kernel
    and file system support it (a plain rename would replace a file, or an empty folder, that appeared)."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):  # no atomic primitive here: the narrowest check we can make
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _apply_umask(path: Path) -> None:
    """Modes from the user's umask for everything written (some writers create files 0600)."""
    mask = _umask()
    if path.is_file():
        os.chmod(path, 0o666 & ~mask)
        return
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def _temp_prefix(out: Path, what: str) -> str:
    return f".{out.name}.{what}-{os.getpid()}-"


def _changed(target: Target) -> CheckpointError:
    what = "was created" if target.seen is None else "was replaced or changed"
    return CheckpointError(f"{target.path} {what} by someone else while this run was working; nothing was "
                           "replaced and this run's result is discarded (pass --force and run again to replace it)")


def publish(tmp: Path, target: Target) -> None:
    """Move the completed `tmp` into place, if the target is still as it was checked."""
    _apply_umask(tmp)
    out = target.path
    if _identity(out) != target.seen:
        raise _changed(target)
    if target.seen is None:
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise _changed(target) from None
        return
    trash = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "old"), dir=out.parent))
    os.replace(out, trash / out.name)
    try:
        rename_noreplace(tmp, out)
    except FileExistsError:
        raise _changed(target) from None
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def _parents_made(path: Path) -> Iterator[None]:
    """Create the missing folders above `path`; remove the ones made here if the block fails."""
    missing = []
    p = path.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for m in missing:  # innermost first; only while empty, so nothing of anyone else's goes
            try:
                m.rmdir()
            except OSError:
                break
        raise


@contextmanager
def atomic_dir(out: str | Path | Target, force: bool = False, *, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """A temporary sibling folder to write into, holding the target's companion files already; published to
    `out` when the block completes, removed when it raises (KeyboardInterrupt included)."""
    target = prepare_output(out, force, kind="dir", inputs=inputs)
    with _parents_made(target.path):
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.path, "tmp"), dir=target.path.parent))
        try:
            # Companions first, so that what the block writes (a checkpoint's model card) can read them.
            for name, text in target.companions:
                (tmp / name).write_text(text, encoding="utf-8")
            yield tmp
            publish(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: str | Path | Target, force: bool = False, *,
                inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """A temporary sibling path to write one file to; published to `out` when the block completes, removed
    when it raises."""
    target = prepare_output(out, force, kind="file", inputs=inputs)
    with _parents_made(target.path):
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(target.path, "tmp"), dir=target.path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            publish(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def sibling_scratch(out: Path) -> Iterator[Path]:
    """A scratch folder beside an output, named like its temporary siblings so that the next run writing the
    same output removes what a killed one left."""
    path = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_json(data: Any, out: str | Path | Target, force: bool = False, *,
               inputs: Iterable[str | Path] = ()) -> Path:
    """Write a user's JSON output all or nothing (never over an existing file without `force`)."""
    with atomic_file(out, force, inputs=inputs) as tmp:
        _dump_json(data, tmp)
    return Path(out)


def _dump_json(data: Any, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# --- prunekit's own files ------------------------------------------------------------------------------------------
# Every writer of an owned file or folder writes the same content for the same name (a cache entry is named by
# what it holds), so the last writer wins instead of refusing.
@contextmanager
def owned_file(path: str | Path) -> Iterator[Path]:
    """A file prunekit owns (a cache entry, resumable state), replaced all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def owned_dir(path: str | Path) -> Iterator[Path]:
    """A folder prunekit owns (a converted built-in model, a teacher's logits), replaced all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        trash = Path(tempfile.mkdtemp(prefix=_temp_prefix(path, "old"), dir=path.parent))
        if os.path.lexists(path):
            os.replace(path, trash / path.name)
        try:
            os.replace(tmp, path)
        except OSError as e:  # another writer's equal folder landed in between: keep it
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --- scratch folders ---------------------------------------------------------------------------------------------
@contextmanager
def scratch_dir(what: str, parent: str | Path | None = None) -> Iterator[Path]:
    """A scratch folder `prunekit-<what>-<pid>-<random>` under `parent` (a folder the user gave for work
    files) or `temp_root()`, removed on the way out; what killed runs left there is removed first."""
    root = Path(parent) if parent is not None else temp_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    remove_dead(root, _SCRATCH)
    path = Path(tempfile.mkdtemp(prefix=f"prunekit-{what}-{os.getpid()}-", dir=root))
    try:
        pause_point(f"scratch-{what}")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
