"""What every job shares: loading a model as a layer source (in memory, or layer-streamed when it would not
fit), its calibration data and this rank's shard, and the scorers and collectors wrapped with the cache and
the all-reduce. The jobs themselves (`score`, `drop`, `width`, `heal`) compose these; the CLI calls them."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from prunekit.adapters import get_adapter
from prunekit.data import CalibrationData, calibration_texts
from prunekit.drop.scorer import SimilarityScorer
from prunekit.engine.memory import should_stream
from prunekit.engine.sources import LayerSource, ResidentLayers
from prunekit.engine.streamed import StreamedLayers
from prunekit.engine.sums import OneProcess, Sums
from prunekit.errors import CheckpointError
from prunekit.io.checkpoint import load_model, load_tokenizer, resolve_model_path
from prunekit.io.outputs import check_writable
from prunekit.jobs.cache import (
    CachedScorer,
    CachedWidthCollector,
    RunLock,
    ScoreCache,
    model_fingerprint,
    remove_dead_runs,
    score_key,
)
from prunekit.jobs.dist import (
    AllReduceCollector,
    AllReduceScorer,
    AllReduceSums,
    DistEnv,
    process_group,
    resolve_device,
    shard_calibration,
)
from prunekit.width.importance import SCORERS
from prunekit.width.stats import ActivationCollector


def writable_dir(path: str | Path | None, what: str) -> Path | None:
    """Create `path` if needed and check that files can be written there (before any expensive work)."""
    if path is None:
        return None
    p = Path(path)
    check_writable(p, what)
    return p


@contextmanager
def distributed(device: str, offload_dir: str | Path | None) -> Iterator[tuple[DistEnv, torch.device]]:
    """This process's rank and device, inside the torchrun process group when there is one; the offload
    directory is checked before anything is loaded."""
    env = DistEnv.from_env()
    dev = resolve_device(device, env)
    writable_dir(offload_dir, "the offload directory")
    with process_group(env, dev):
        yield env, dev


@dataclass
class Job:
    """What a job has loaded: the model as a layer source, its tokenizer and calibration data (all of it, and
    this rank's shard), and how this rank's sums become totals (`sums`)."""

    env: DistEnv
    device: torch.device
    spec: str
    local: Path | None
    source: LayerSource
    tokenizer: Any
    calib: CalibrationData
    shard: CalibrationData
    streamed: bool
    sums: Sums


def load_job(model: str, *, calib: str | Path, samples: int, seq_len: int, batch_size: int, dtype: str,
             env: DistEnv, device: torch.device, stream: bool | None) -> Job:
    """`stream`: True = layer-streamed, False = in memory, None = streamed only when it would not fit."""
    path = resolve_model_path(model)
    local = Path(path) if Path(path).is_dir() else None
    streamed = should_stream(path, dtype, device) if stream is None else stream
    source: LayerSource
    if streamed:
        if local is None:
            raise CheckpointError(f"--stream needs a local checkpoint directory; {model!r} is not one")
        source, tok = StreamedLayers(local, dtype=dtype, device=device), load_tokenizer(local, model)
    else:
        net, tok = load_model(path, dtype=dtype, device=device)
        source = ResidentLayers(net, get_adapter(net))
    data = calibration_texts(tok, calib, samples, seq_len)
    sums = AllReduceSums(env, device, batch_size) if env.is_distributed else OneProcess()
    return Job(env, device, str(model), local, source, tok, data, shard_calibration(data, batch_size, env), streamed,
               sums)


def cache_key(job: Job, options: dict[str, Any]) -> str:
    assert job.local is not None
    return score_key(model_fingerprint(job.local), job.shard, {**options, "device": job.device.type})


class ScorerFactory:
    """Builds `make_scorer(pairwise, rescore)` for `llm_drop`: cached and all-reduced; remembers its scorers
    so their work directories can be removed at the end.

    Where hidden states live: a resumable source (streamed: long runs) keeps them in the cache's run
    directory for its key (or `offload_dir`), so the same command started again continues where an
    interrupted one stopped; a resident model keeps them in RAM."""

    def __init__(self, job: Job, *, batch_size: int, dtype: str, offload_dir: str | Path | None, use_cache: bool,
                 progress: bool):
        self.job = job
        self.batch_size = batch_size
        self.dtype = dtype
        self.offload_dir = Path(offload_dir) if offload_dir is not None else None
        self.cache = ScoreCache() if use_cache and job.local is not None else None
        self.progress = progress and job.env.is_main
        self.scorers: list[tuple[SimilarityScorer, bool]] = []  # (scorer, work dir kept for a resume)
        self.cached: list[CachedScorer] = []
        self.locks: list[RunLock] = []
        for folder in (self.offload_dir, self.cache.root / "runs" if self.cache else None):
            if folder is not None:
                remove_dead_runs(folder)

    def _work_dir(self, key: str | None) -> tuple[Path | None, bool]:
        """(where this scorer's hidden states live, whether that place is keyed and so kept for a resume)."""
        if not self.job.source.resumable:
            return None, False
        private = f"run-{os.getpid()}-{self.job.env.rank}"
        if key is not None:
            keyed = self.offload_dir / key if self.offload_dir else self.cache.run_dir(key)  # type: ignore[union-attr]
            lock = RunLock.claim(self.cache.lock_file(key))  # type: ignore[union-attr]
            if lock is not None:
                self.locks.append(lock)
                return keyed, True
            # Another live run with the same options holds it: work apart (not resumable) rather than share.
            return keyed.with_name(f"{keyed.name}-{private}"), False
        if self.offload_dir is not None:
            return self.offload_dir / private, False
        return None, False

    def __call__(self, pairwise: bool, rescore: bool) -> Any:
        job = self.job
        key = None
        if self.cache is not None:
            key = cache_key(job, {"batch_size": self.batch_size, "pairwise": pairwise, "dtype": str(self.dtype)})
        work, keyed = self._work_dir(key)
        scorer = SimilarityScorer(job.source, job.shard, batch_size=self.batch_size, pairwise=pairwise,
                                  rescore=rescore, work_dir=work, progress=self.progress)
        self.scorers.append((scorer, keyed))
        wrapped: Any = scorer
        if self.cache is not None and key is not None:
            wrapped = CachedScorer(scorer, self.cache, key, job.shard.describe(),
                                   info={"model": job.spec, "calibration": job.shard.describe()})
            self.cached.append(wrapped)
        if job.env.is_distributed:
            wrapped = AllReduceScorer(wrapped, job.calib.describe(), job.sums)
        return wrapped

    def cleanup(self, success: bool) -> None:
        """Remove work directories: all after success; after a failure only those that cannot be resumed."""
        for s, keyed in self.scorers:
            if success or not keyed:
                s.cleanup()
        for lock in self.locks:
            lock.release()

    @property
    def cache_hit(self) -> bool:
        return any(c.hit for c in self.cached)


@contextmanager
def scoring_job(model: str, *, calib: str | Path, samples: int, seq_len: int, batch_size: int, dtype: str,
                device: str, stream: bool | None, offload_dir: str | Path | None, use_cache: bool,
                progress: bool) -> Iterator[tuple[Job, ScorerFactory]]:
    """A loaded job and its scorer factory, inside the torchrun process group when there is one; the
    scorers' work directories are cleaned up afterwards (a resumable one is kept after a failure)."""
    with distributed(device, offload_dir) as (env, dev):
        job = load_job(model, calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                       env=env, device=dev, stream=stream)
        factory = ScorerFactory(job, batch_size=batch_size, dtype=dtype, offload_dir=offload_dir,
                                use_cache=use_cache, progress=progress)
        ok = False
        try:
            yield job, factory
            ok = True
        finally:
            factory.cleanup(ok)


def width_collector(job: Job, *, scorer: str, batch_size: int, dtype: str, offload_dir: str | Path | None,
                    use_cache: bool, progress: bool) -> tuple[Any, ActivationCollector]:
    """(the collector `width_prune` calls, the inner one whose work directory to clean up). Every shot's
    statistics are cached (keyed also by the widths cut so far), so an interrupted run resumes per shot."""
    keep_weights = SCORERS[scorer].uses_weight
    work = None
    if offload_dir is not None and job.source.resumable:
        remove_dead_runs(Path(offload_dir))
        work = Path(offload_dir) / f"width-run-{os.getpid()}-{job.env.rank}"
    inner = ActivationCollector(job.source, job.shard, batch_size=batch_size, work_dir=work,
                                keep_weights=keep_weights, progress=progress and job.env.is_main)
    collector: Any = inner
    if use_cache and job.local is not None:
        key = cache_key(job, {"kind": "width", "batch_size": batch_size, "dtype": str(dtype), "weights": keep_weights})
        collector = CachedWidthCollector(collector, ScoreCache(), key,
                                         info={"model": job.spec, "calibration": job.shard.describe()})
    if job.env.is_distributed:
        collector = AllReduceCollector(collector, job.sums)
    return collector, inner

