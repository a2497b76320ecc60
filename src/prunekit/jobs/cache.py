"""Resumable statistics cache: the float64 sums of a statistics pass kept on disk under `$PRUNEKIT_CACHE/scores`.

Entries. Every pass's accumulator is an `engine.sums.Summable`, so an entry is its named tensors in one
safetensors file, whatever the algorithm (LLM-Drop's cosine sums, TransAct's squared activation sums,
compress's Grams and Fishers); this module never reads an algorithm's fields.

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
cache their shard and the shards still add up (`engine.sums.totalled`).

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
from prunekit.engine.sums import S, Summable
from prunekit.io.outputs import owned_file, remove_dead
from prunekit.io.paths import cache_dir
from prunekit.width.stats import WidthStats

CACHE_FORMAT = 2
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

    def get(self, name: str, kind: type[S]) -> S | None:
        """The `engine.sums.Summable` of type `kind` stored under `name`, or None (missing or damaged: a miss)."""
        tensors = self._read(self.root / f"{name}.safetensors")
        try:
            return kind.from_tensors(tensors) if tensors is not None else None
        except Exception:  # a damaged entry is a miss
            return None

    def put(self, name: str, sums: Summable, info: dict[str, Any] | None = None) -> Path:
        return self._write(self.root / f"{name}.safetensors", sums.to_tensors(), info)

    # One entry format for every pass; the prefixes only keep the kinds apart when listing the folder.
    def load(self, key: str) -> SimilarityAccumulator | None:
        return self.get(key, SimilarityAccumulator)

    def store(self, key: str, acc: SimilarityAccumulator, info: dict[str, Any] | None = None) -> Path:
        return self.put(key, acc, info)

    def load_width(self, key: str) -> WidthStats | None:
        return self.get(f"width-{key}", WidthStats)

    def store_width(self, key: str, stats: WidthStats, info: dict[str, Any] | None = None) -> Path:
        return self.put(f"width-{key}", stats, info)

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
                widths: Any = None) -> WidthStats:
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


class PassCache:
    """Finished statistics passes of one run, by step (`compress.stats.StatsStore`, or any pass whose result
    is `Summable`): entry `<prefix>-<sha256(key, step)>`. `key` must fix everything the passes depend on
    (model files, calibration tokens, options), so a run started again finds the passes an interrupted or
    earlier identical run finished and computes from the first missing one."""

    def __init__(self, cache: ScoreCache, key: str, kind: type[Summable], prefix: str,
                 info: dict[str, Any] | None = None):
        self.cache, self.key, self.kind, self.prefix, self.info = cache, key, kind, prefix, info
        self.hits: list[str] = []

    def _name(self, step: str) -> str:
        return f"{self.prefix}-{hashlib.sha256(json.dumps([self.key, step]).encode()).hexdigest()}"

    def get(self, step: str) -> Any:
        found = self.cache.get(self._name(step), self.kind)
        if found is not None:
            self.hits.append(step)
        return found

    def put(self, step: str, sums: Summable) -> None:
        self.cache.put(self._name(step), sums, {**(self.info or {}), "step": step})
