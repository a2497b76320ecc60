"""Resumable score cache: LLM-Drop accumulator sums kept on disk under `$PRUNEKIT_CACHE/scores`.

Key. sha256 over (format, prunekit version, model fingerprint, calibration-token hash, options).

* Model fingerprint: the *names, sizes and modification times* (ns) of the weight files and the index, plus
  the sha256 of config.json's content. Not a content hash of the weights: hashing 140 GB of a 70B model
  takes minutes, about as long as the scoring it would save. Any rewrite of a weight file changes its mtime
  (and usually its size), so a stale entry is never used for a changed checkpoint; the price is that a
  byte-identical copy elsewhere (new mtime) gets a fresh entry.
* Calibration: sha256 of the exact token ids (the hash plans already carry) and of the attention mask.
* Options: everything that changes the numbers: batch size (float32 kernels round differently for other
  batch shapes), pairwise on/off, dtype, device type.

What is cached: the accumulator's float64 *sums* and token counts, not the means, so data-parallel ranks can
cache their shard and the shards still add up (`prunekit.jobs.dist`).

Resuming. An interrupted streamed run resumes from its last finished layer: the states at the layer boundary
and the sums so far live in the run's work directory (`run_dir(key)`, see `drop.scorer.SimilarityScorer`), written
after every layer. Persisting the boundary states (rather than recomputing them on resume) costs one write
of the calibration hidden states per layer, small next to reading the layer's weights, and makes a resume
cost nothing but the remaining layers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prunekit import __version__
from prunekit.data import CalibrationData, token_hash
from prunekit.drop.similarity import SimilarityAccumulator, SimilarityScores
from prunekit.io.outputs import owned_file, remove_dead
from prunekit.io.paths import cache_dir
from prunekit.width.importance import SquaredSums
from prunekit.width.stats import LayerActivations

CACHE_FORMAT = 1
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.index.json", "config.json")


def model_fingerprint(path: str | Path) -> str:
    """Fingerprint of a local checkpoint directory: weight files' names, sizes and mtimes, and config.json's
    content hash (see the module docstring for why not a content hash of the weights)."""
    path = Path(path)
    entries: list[Any] = []
    for pattern in _WEIGHT_GLOBS:
        for f in sorted(path.glob(pattern)):
            st = f.stat()
            entries.append([f.name, st.st_size, st.st_mtime_ns])
    cfg = path / "config.json"
    entries.append(["config.json#sha256", hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else None])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def calibration_fingerprint(calib: CalibrationData) -> str:
    return hashlib.sha256((calib.sha256 + token_hash(calib.attention_mask)).encode()).hexdigest()


def score_key(model_fp: str, calib: CalibrationData, options: dict[str, Any]) -> str:
    """Cache key of one scoring job (hex sha256)."""
    payload = {"format": CACHE_FORMAT, "prunekit": __version__, "model": model_fp,
               "calibration": calibration_fingerprint(calib), "options": options}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ScoreCache:
    """Accumulator sums by key under `root` (default `$PRUNEKIT_CACHE/scores`), plus per-key work
    directories for resumable streamed runs. Entries are written atomically; a damaged entry is a miss."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "scores"

    def _file(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def _width_file(self, key: str) -> Path:
        return self.root / f"width-{key}.safetensors"

    @staticmethod
    def _read(path: Path) -> dict[str, torch.Tensor] | None:
        """An entry's tensors, or None when it is missing or unreadable (recompute rather than fail)."""
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as st:
                return {k: st.get_tensor(k).clone() for k in st.keys()}
        except Exception:
            return None

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any] | None) -> Path:
        """Write an entry all or nothing (`owned_file`: what a killed writer left is cleaned up later)."""
        with owned_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"info": json.dumps(info or {})})
        return path

    def load(self, key: str) -> SimilarityAccumulator | None:
        tensors = self._read(self._file(key))
        try:
            return SimilarityAccumulator.from_tensors(tensors) if tensors is not None else None
        except Exception:  # a damaged entry is a miss
            return None

    def store(self, key: str, acc: SimilarityAccumulator, info: dict[str, Any] | None = None) -> Path:
        return self._write(self._file(key), acc.to_tensors(), info)

    def load_width(self, key: str) -> dict[int, Any] | None:
        """Width statistics (`width.LayerActivations` by layer) stored under `key`, or None (miss/damaged)."""
        tensors = self._read(self._width_file(key))
        try:
            return width_stats_from_tensors(tensors) if tensors is not None else None
        except Exception:  # a damaged entry is a miss
            return None

    def store_width(self, key: str, stats: dict[int, Any], info: dict[str, Any] | None = None) -> Path:
        return self._write(self._width_file(key), width_stats_tensors(stats), info)

    def lock_file(self, key: str) -> Path:
        return self.root / "locks" / f"{key}.lock"

    def run_dir(self, key: str) -> Path:
        """Work directory of a streamed run with this key (hidden states and progress, for resuming)."""
        return self.root / "runs" / key


class RunLock:
    """An exclusive lock on a keyed work directory (flock on `locks/<key>.lock` in the score cache), held
    while a run uses it, so two runs with the same options at once never share (and delete) each other's
    half-finished states. The OS releases it when the process dies, so a killed run never leaves it locked;
    the small lock file stays (removing it would let a third process lock a different file of that name)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def claim(cls, path: Path) -> "RunLock | None":
        """The lock, or None when another live process holds it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(fd, path)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


_PRIVATE_RUN = re.compile(r"(^|-)(width-)?run-(?P<pid>\d+)-\d+$")


def remove_dead_runs(folder: Path) -> None:
    """Remove the private (per-process, not resumable) work directories under `folder` whose process is gone:
    what a SIGKILL left behind."""
    remove_dead(folder, _PRIVATE_RUN)


class CachedScorer:
    """Wraps a scorer (`drop.SimilarityScorer`): the first full scoring is
    looked up in / stored to the cache; re-scores after drops (`start_layer` > 0) go to the wrapped scorer.

    After a hit the wrapped scorer has never run, so its first re-score is a full pass (both scorers start
    from the token ids when they hold no states) - correct, merely slower than after a miss."""

    def __init__(self, inner: Any, cache: ScoreCache, key: str, calibration: dict[str, Any],
                 info: dict[str, Any] | None = None):
        self.inner = inner
        self.cache = cache
        self.key = key
        self.calibration = calibration
        self.info = info
        self.hit = False
        self._acc: SimilarityAccumulator | None = None
        self._first = True

    @property
    def acc(self) -> SimilarityAccumulator | None:
        return self._acc if self._acc is not None else self.inner.acc

    def score(self, start_layer: int = 0) -> SimilarityScores:
        if self._first and start_layer == 0:
            self._first = False
            cached = self.cache.load(self.key)
            if cached is not None:
                self.hit = True
                self._acc = cached
                return cached.result(self.calibration)
            result = self.inner.score()
            self.cache.store(self.key, self.inner.acc, self.info)
            return result
        self._first = False
        self._acc = None
        return self.inner.score(start_layer)


# --- width statistics (TransAct importances) ---------------------------------------------------------------------
# Flat tensor names: "<layer>.<attn|mlp>.<sums|tokens|weight>"; a layer with neither part is stored as an
# empty marker so the layer set round-trips.

def width_stats_tensors(stats: dict[int, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, st in stats.items():
        out[f"{i}.present"] = torch.zeros(0)
        for part in ("attn", "mlp"):
            acc = getattr(st, part)
            if acc is None:
                continue
            out[f"{i}.{part}.sums"] = acc.sums.detach().to("cpu", torch.float64).contiguous()
            out[f"{i}.{part}.tokens"] = torch.tensor([acc.tokens], dtype=torch.int64)
            w = getattr(st, f"{part}_weight")
            if w is not None:
                out[f"{i}.{part}.weight"] = w.detach().to("cpu", torch.float64).contiguous()
    return out


def width_stats_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[int, Any]:
    layers = sorted({int(k.split(".")[0]) for k in tensors})
    stats: dict[int, Any] = {}
    for i in layers:
        st = LayerActivations()
        for part in ("attn", "mlp"):
            sums = tensors.get(f"{i}.{part}.sums")
            if sums is None:
                continue
            acc = SquaredSums(sums.shape[0])
            acc.sums.copy_(sums)
            acc.tokens = int(tensors[f"{i}.{part}.tokens"][0])
            setattr(st, part, acc)
            setattr(st, f"{part}_weight", tensors.get(f"{i}.{part}.weight"))
        stats[i] = st
    return stats


class CachedWidthCollector:
    """Wraps a `width.WidthCollector`: every shot's statistics are looked up in / stored to the cache under
    `key` plus the parts asked for plus the widths cut so far (the kept original indices, which together
    with the model files, the calibration tokens and the options determine the statistics exactly).

    So a repeated run skips every pass, and an interrupted width run, started again, replays the finished
    shots from the cache (the planning is deterministic, so it arrives at the same widths) and computes from
    the first unfinished shot on. The model must be the one the key's files describe (`width_job` loads it
    fresh), not one changed in memory before."""

    def __init__(self, inner: Any, cache: ScoreCache, key: str, info: dict[str, Any] | None = None):
        self.inner = inner
        self.cache = cache
        self.key = key
        self.info = info
        self.hits = 0
        self.misses = 0

    @property
    def hit(self) -> bool:
        return self.hits > 0

    def collect(self, *, attn: bool = True, mlp: bool = True, desc: str = "width scoring",
                widths: Any = None) -> dict[int, Any]:
        cut = {str(i): w.to_json() for i, w in sorted((widths or {}).items())}
        key = hashlib.sha256(json.dumps([self.key, attn, mlp, cut], sort_keys=True).encode()).hexdigest()
        cached = self.cache.load_width(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        stats = self.inner.collect(attn=attn, mlp=mlp, desc=desc, widths=widths)
        self.cache.store_width(key, stats, self.info)
        return stats
