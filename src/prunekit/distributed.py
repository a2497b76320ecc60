"""Data-parallel scoring with torch.distributed, and the `score` / `drop` / `width` jobs the CLI runs.

Under `torchrun --nproc-per-node N -m prunekit score ...` every process (rank) reads `RANK` / `WORLD_SIZE`
/ `LOCAL_RANK` from the environment torchrun sets, joins a process group (gloo on the CPU, nccl on CUDA),
scores its share of the calibration batches, and the ranks all-reduce the accumulator's float64 sums and
token counts; rank 0 writes the output. Sharding is by whole batches (batch b goes to rank b % N), so every
batch is computed exactly as in a single process and the result differs from the single-process one only
by the order of the float64 additions (~1e-16).

Jobs. `score_job` / `drop_job` pick the in-memory or the layer-streamed path (`stream=None`: streamed when
the checkpoint would not fit in the free memory of the device), wrap the scorer with the score cache
(`prunekit.score_cache`) and the all-reduce, and guard against inf/NaN activations (half precision).
Accumulation is float32 per-token dot products and float64 sums whatever the weights' dtype.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.data import CalibrationData
from prunekit.errors import CheckpointError, DataError, StorageError
from prunekit.plans import PruningPlan
from prunekit.scoring import SimilarityAccumulator, SimilarityScores
from prunekit.stream import ActivationOverflowError, check_finite

__all__ = ["ActivationOverflowError", "AllReduceCollector", "AllReduceScorer", "DistEnv", "ScoreJobResult",
           "all_reduce_accumulator", "drop_job", "overflow_guard", "process_group", "resolve_device", "score_job",
           "shard_calibration", "width_job", "writable_dir"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 outside one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DistEnv":
        env = os.environ if environ is None else environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError as e:
            raise DataError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from e
        if world < 1 or not 0 <= rank < world:
            raise DataError(f"inconsistent torch.distributed environment: RANK={rank}, WORLD_SIZE={world}")
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | torch.device, env: DistEnv) -> torch.device:
    """`cuda` becomes this rank's GPU (`cuda:LOCAL_RANK`) in a multi-process job."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError("--device cuda was asked for but no CUDA device is available")
        if dev.index is None and env.is_distributed:
            dev = torch.device("cuda", env.local_rank)
    return dev


@contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[DistEnv]:
    """Join (and finally leave) the default process group when running under torchrun."""
    if not env.is_distributed:
        yield env
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield env
    finally:
        dist.destroy_process_group()


def shard_calibration(calib: CalibrationData, batch_size: int, env: DistEnv) -> CalibrationData:
    """This rank's batches: b = rank, rank + N, ... of `calib.batches(batch_size)`, as a `CalibrationData`
    whose own batches (same batch size) are exactly those batches."""
    n_batches = -(-len(calib.input_ids) // batch_size)
    if n_batches < env.world_size:
        raise DataError(f"{env.world_size} processes need at least {env.world_size} calibration batches, but "
                        f"{len(calib.input_ids)} samples make {n_batches} batches of {batch_size}; lower "
                        "--batch-size or raise --samples")
    if not env.is_distributed:
        return calib
    rows = [r for b in range(env.rank, n_batches, env.world_size)
            for r in range(b * batch_size, min((b + 1) * batch_size, len(calib.input_ids)))]
    idx = torch.tensor(rows)
    ids = calib.input_ids[idx]
    from prunekit.data import token_hash

    return CalibrationData(ids, calib.attention_mask[idx], calib.source, token_hash(ids))


def all_reduce_accumulator(acc: SimilarityAccumulator, device: torch.device) -> SimilarityAccumulator:
    """A new accumulator holding the sums over all ranks (`acc` itself is left as this rank's)."""
    import torch.distributed as dist

    out = SimilarityAccumulator(acc.num_layers, acc.pair is not None)
    comm = device if device.type == "cuda" else torch.device("cpu")
    for name in ("block", "attn", "mlp", "tokens", "pair"):
        mine = getattr(acc, name)
        if mine is None:
            continue
        t = mine.detach().to(comm, torch.float64).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        getattr(out, name).copy_(t.cpu())
    return out


class AllReduceScorer:
    """Wraps a scorer that sees this rank's shard: every `score` all-reduces its sums (every rank gets the
    global scores, so iterative dropping picks the same module everywhere)."""

    def __init__(self, inner: Any, calibration: dict[str, Any], device: torch.device):
        self.inner = inner
        self.calibration = calibration
        self.device = device
        self.acc: SimilarityAccumulator | None = None

    def score(self, start_layer: int = 0) -> SimilarityScores:
        self.inner.score(start_layer)
        self.acc = all_reduce_accumulator(self.inner.acc, self.device)
        return self.acc.result(self.calibration)


@contextmanager
def overflow_guard(adapter: ModelAdapter) -> Iterator[None]:
    """Raise `ActivationOverflowError` as soon as a decoder layer of an in-memory model outputs inf/NaN
    (the streamed scorer checks the same in its observers)."""
    handles = []

    def hook(i: int) -> Callable[..., None]:
        def check(module: nn.Module, args: Any, output: Any) -> None:
            check_finite(output[0] if isinstance(output, (tuple, list)) else output, f"layer {i}")
        return check

    for i, layer in enumerate(adapter.layers()):
        handles.append(layer.register_forward_hook(hook(i)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- jobs -------------------------------------------------------------------------------------------------------

def writable_dir(path: str | Path | None, what: str) -> Path | None:
    """Create `path` if needed and check that files can be written there (before any expensive work)."""
    if path is None:
        return None
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".prunekit-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StorageError(f"{what} {p} cannot be written: {e.strerror or e}") from e
    return p


@dataclass
class _Job:
    """What a score/drop job has loaded: a model (in memory or a streamed skeleton) and its calibration data."""

    env: DistEnv
    device: torch.device
    source: str
    local: Path | None
    streamed: bool
    model: nn.Module
    adapter: ModelAdapter
    tokenizer: Any
    calib: CalibrationData
    shard: CalibrationData
    streamed_model: Any = None


def _load(model: str, *, calib_source: str | Path, samples: int, seq_len: int, batch_size: int, dtype: str,
          device: torch.device, stream: bool | None, env: DistEnv) -> _Job:
    from prunekit.checkpoint import load_model, resolve_model_path
    from prunekit.data import calibration_data
    from prunekit.stream import StreamedModel, should_stream

    path = resolve_model_path(model)
    local = Path(path) if Path(path).is_dir() else None
    streamed = should_stream(path, dtype, device) if stream is None else stream
    if streamed:
        if local is None:
            raise CheckpointError(f"--stream needs a local checkpoint directory; {model!r} is not one")
        from transformers import AutoTokenizer

        sm = StreamedModel(local, dtype=dtype, device=device)
        try:
            tok = AutoTokenizer.from_pretrained(str(local))
        except Exception as e:
            raise CheckpointError(f"cannot load a tokenizer from {local}: {e}") from e
        net, adapter = sm.model, sm.adapter
    else:
        from prunekit.adapters import get_adapter

        sm = None
        net, tok = load_model(path, dtype=dtype, device=device)
        adapter = get_adapter(net)
    calib = calibration_data(tok, calib_source, samples, seq_len)
    shard = shard_calibration(calib, batch_size, env)
    return _Job(env, device, str(model), local, streamed, net, adapter, tok, calib, shard, sm)


class _ScorerFactory:
    """Builds `make_scorer(pairwise, rescore)` for `llm_drop`: in-memory or streamed, cached, all-reduced;
    remembers the streamed scorers so their work directories can be removed at the end."""

    def __init__(self, job: _Job, *, batch_size: int, dtype: str, offload_dir: str | Path | None, use_cache: bool,
                 progress: bool):
        self.job = job
        self.batch_size = batch_size
        self.dtype = dtype
        self.offload_dir = Path(offload_dir) if offload_dir is not None else None
        self.use_cache = use_cache and job.local is not None
        self.progress = progress and job.env.is_main
        # (streamed scorer, whether its work directory is keyed, i.e. worth keeping for a resume)
        self.streamed_scorers: list[tuple[Any, bool]] = []
        self.cached: list[Any] = []

    def key(self, pairwise: bool) -> str:
        from prunekit.score_cache import model_fingerprint, score_key

        assert self.job.local is not None
        options = {"batch_size": self.batch_size, "pairwise": pairwise, "dtype": str(self.dtype),
                   "device": self.job.device.type}
        return score_key(model_fingerprint(self.job.local), self.job.shard, options)

    def __call__(self, pairwise: bool, rescore: bool) -> Any:
        from prunekit.calibration import SimilarityScorer
        from prunekit.score_cache import CachedScorer, ScoreCache

        job = self.job
        cache = ScoreCache() if self.use_cache else None
        key = self.key(pairwise) if cache is not None else None
        scorer: Any
        if job.streamed:
            from prunekit.stream import StreamedScorer

            if key is not None:
                work = (self.offload_dir / key if self.offload_dir else cache.run_dir(key))  # type: ignore[union-attr]
            elif self.offload_dir is not None:
                work = self.offload_dir / f"run-{os.getpid()}-{job.env.rank}"
            else:
                work = None  # hidden states in RAM
            scorer = StreamedScorer(job.streamed_model, job.shard, batch_size=self.batch_size, pairwise=pairwise,
                                    rescore=rescore, work_dir=work, progress=self.progress)
            self.streamed_scorers.append((scorer, key is not None))
        else:
            scorer = SimilarityScorer(job.model, job.adapter, job.shard, batch_size=self.batch_size,
                                      pairwise=pairwise, rescore=rescore, progress=self.progress)
        if cache is not None and key is not None:
            scorer = CachedScorer(scorer, cache, key, job.shard.describe(),
                                  info={"model": job.source, "calibration": job.shard.describe()})
            self.cached.append(scorer)
        if job.env.is_distributed:
            scorer = AllReduceScorer(scorer, job.calib.describe(), job.device)
        return scorer

    def cleanup(self, success: bool) -> None:
        """Remove streamed work directories: all after success; after a failure only those that cannot be
        resumed (a keyed one is kept, so running the same command again continues where this one stopped)."""
        for s, keyed in self.streamed_scorers:
            if success or not keyed:
                s.cleanup()

    @property
    def cache_hit(self) -> bool:
        return any(c.hit for c in self.cached)


@contextmanager
def _scoring(factory: _ScorerFactory) -> Iterator[None]:
    """Guard against overflow while scoring, and clean the streamed work directories up afterwards."""
    ok = False
    try:
        with _guard(factory.job):
            yield
        ok = True
    finally:
        factory.cleanup(ok)


@dataclass
class ScoreJobResult:
    scores: SimilarityScores
    model_info: dict[str, Any]
    streamed: bool
    cache_hit: bool


def score_job(model: str, *, calib: str | Path = "c4", samples: int = 16, seq_len: int = 512, batch_size: int = 4,
              dtype: str = "float32", device: str = "cpu", stream: bool | None = None,
              offload_dir: str | Path | None = None, use_cache: bool = True,
              progress: bool = True) -> ScoreJobResult | None:
    """LLM-Drop scores of `model` with its `drop.model_info`; None on ranks other than 0 of a torchrun job.

    `stream`: True = layer-streamed, False = in memory, None = streamed only when the model would not fit.
    `offload_dir`: where streamed hidden states spill (default: the cache's run directory, or RAM with
    `use_cache=False`). `use_cache`: look up / store the sums in `$PRUNEKIT_CACHE` and resume interrupted
    streamed runs."""
    from prunekit.drop import model_info

    env = DistEnv.from_env()
    dev = resolve_device(device, env)
    writable_dir(offload_dir, "the offload directory")
    with process_group(env, dev):
        job = _load(model, calib_source=calib, samples=samples, seq_len=seq_len, batch_size=batch_size,
                    dtype=dtype, device=dev, stream=stream, env=env)
        factory = _ScorerFactory(job, batch_size=batch_size, dtype=dtype, offload_dir=offload_dir,
                                 use_cache=use_cache, progress=progress)
        scorer = factory(True, False)
        with _scoring(factory):
            scores = scorer.score()
        result = ScoreJobResult(scores, model_info(job.adapter, model), job.streamed, factory.cache_hit)
    return result if env.is_main else None


def drop_job(model: str, out: str | Path, *, target: str, n: int, consecutive: bool = False,
             iterative: bool = False, calib: str | Path = "c4", samples: int = 16, seq_len: int = 512,
             batch_size: int = 4, dtype: str = "float32", device: str = "cpu", stream: bool | None = None,
             offload_dir: str | Path | None = None, use_cache: bool = True, force: bool = False,
             progress: bool = True) -> PruningPlan | None:
    """LLM-Drop end to end: score, choose, save the pruned checkpoint to `out` (rank 0 saves; the plan is
    returned on rank 0, None elsewhere). Streamed jobs save with `stream.save_pruned_streamed`, which never
    holds the whole model. Options as in `score_job`."""
    from prunekit.checkpoint import prepare_output_dir
    from prunekit.drop import llm_drop
    from prunekit.surgery import apply_plan

    env = DistEnv.from_env()
    dev = resolve_device(device, env)
    prepare_output_dir(out, force)  # fail before any expensive work
    writable_dir(offload_dir, "the offload directory")
    with process_group(env, dev):
        job = _load(model, calib_source=calib, samples=samples, seq_len=seq_len, batch_size=batch_size,
                    dtype=dtype, device=dev, stream=stream, env=env)
        factory = _ScorerFactory(job, batch_size=batch_size, dtype=dtype, offload_dir=offload_dir,
                                 use_cache=use_cache, progress=progress)
        with _scoring(factory):
            plan = llm_drop(job.model, job.adapter, job.calib, target=target, n=n,  # type: ignore[arg-type]
                            consecutive=consecutive, iterative=iterative, batch_size=batch_size,
                            progress=progress, source=str(model), make_scorer=factory)
        if not env.is_main:
            return None
        if not job.streamed:
            apply_plan(job.adapter, plan)
        _save(job, plan, out, force=force, dtype=dtype, progress=progress)
    return plan


def _save(job: _Job, plan: PruningPlan, out: str | Path, *, force: bool, dtype: str, progress: bool) -> None:
    """Save a job's result: streamed jobs write from the source files (`stream.save_pruned_streamed`, never
    holding the model); in-memory jobs save the model, which must already carry the plan."""
    from prunekit.checkpoint import save_checkpoint
    from prunekit.stream import save_pruned_streamed

    if job.streamed:
        assert job.local is not None
        save_pruned_streamed(job.local, plan, out, force=force, dtype=dtype, tokenizer=job.tokenizer,
                             progress=progress)
    else:
        save_checkpoint(job.model, job.tokenizer, out, plan, force=force)


class AllReduceCollector:
    """Wraps a `width.WidthCollector` that sees this rank's shard: every `collect` all-reduces the squared
    sums and token counts, so every rank plans the same widths. The weight columns are the same on every
    rank (same weights) and are left alone."""

    def __init__(self, inner: Any, device: torch.device):
        self.inner = inner
        self.device = device

    def collect(self, *, attn: bool = True, mlp: bool = True, desc: str = "width scoring",
                widths: Any = None) -> dict[int, Any]:
        import torch.distributed as dist

        stats = self.inner.collect(attn=attn, mlp=mlp, desc=desc, widths=widths)
        comm = self.device if self.device.type == "cuda" else torch.device("cpu")
        # Same layers and parts on every rank (same model), so the collectives pair up in this order.
        for i in sorted(stats):
            for part in ("attn", "mlp"):
                acc = getattr(stats[i], part)
                if acc is None:
                    continue
                t = acc.sums.detach().to(comm, torch.float64).clone()
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                n = torch.tensor([acc.tokens], dtype=torch.float64, device=comm)
                dist.all_reduce(n, op=dist.ReduceOp.SUM)
                acc.sums.copy_(t.to(acc.sums.device))
                acc.tokens = int(n.item())
        return stats


def width_job(model: str, out: str | Path, *, mlp_keep: float | int | None = None,
              heads_keep: float | int | None = None, mode: str = "uniform", shots: int = 8,
              scorer: str = "activation", head_mode: str = "kv-groups", min_layer_keep: float = 0.1,
              multiple_of: int = 1, calib: str | Path = "c4", samples: int = 16, seq_len: int = 512,
              batch_size: int = 4, dtype: str = "float32", device: str = "cpu", stream: bool | None = None,
              offload_dir: str | Path | None = None, use_cache: bool = True, force: bool = False,
              progress: bool = True) -> tuple[PruningPlan, bool] | None:
    """TransAct width pruning end to end: collect activation statistics (in memory or layer-streamed, one
    process or data-parallel), plan the shots, save the narrowed checkpoint to `out` (rank 0 saves).
    Returns (plan, streamed) on rank 0, None elsewhere. Options as in `width.width_prune` and `score_job`;
    `use_cache` caches every shot's statistics, so a repeated or interrupted run replays the finished shots
    from the cache.

    Streamed, the shots narrow a meta-device skeleton with the ordinary surgery and every pass reads each
    layer from the files already cut to the widths so far; the checkpoint is then written by
    `stream.save_pruned_streamed`. The plan equals the in-memory one (tests)."""
    from prunekit.checkpoint import prepare_output_dir
    from prunekit.importance import SCORERS
    from prunekit.stream import StreamedWidthCollector
    from prunekit.width import ActivationCollector, check_width_options, width_prune

    check_width_options(mlp_keep=mlp_keep, heads_keep=heads_keep, mode=mode, shots=shots, scorer=scorer,
                        head_mode=head_mode, min_layer_keep=min_layer_keep, multiple_of=multiple_of)
    env = DistEnv.from_env()
    dev = resolve_device(device, env)
    prepare_output_dir(out, force)  # fail before any expensive work
    writable_dir(offload_dir, "the offload directory")
    show = progress and env.is_main
    with process_group(env, dev):
        job = _load(model, calib_source=calib, samples=samples, seq_len=seq_len, batch_size=batch_size,
                    dtype=dtype, device=dev, stream=stream, env=env)
        keep_weights = SCORERS[scorer].uses_weight
        collector: Any
        streamed: StreamedWidthCollector | None = None
        if job.streamed:
            work = Path(offload_dir) / f"width-run-{os.getpid()}-{env.rank}" if offload_dir is not None else None
            collector = streamed = StreamedWidthCollector(job.streamed_model, job.shard, batch_size=batch_size,
                                                          work_dir=work, keep_weights=keep_weights, progress=show)
        else:
            collector = ActivationCollector(job.model, job.adapter, job.shard, batch_size=batch_size, progress=show)
        if use_cache and job.local is not None:
            from prunekit.score_cache import CachedWidthCollector, ScoreCache, model_fingerprint, score_key

            options = {"kind": "width", "batch_size": batch_size, "dtype": str(dtype), "device": dev.type,
                       "weights": keep_weights and job.streamed}
            key = score_key(model_fingerprint(job.local), job.shard, options)
            collector = CachedWidthCollector(collector, ScoreCache(), key,
                                             info={"model": job.source, "calibration": job.shard.describe()})
        if env.is_distributed:
            collector = AllReduceCollector(collector, dev)
        try:
            with _guard(job):
                plan = width_prune(job.model, job.adapter, job.calib, mlp_keep=mlp_keep, heads_keep=heads_keep,
                                   mode=mode, shots=shots, scorer=scorer, head_mode=head_mode,  # type: ignore[arg-type]
                                   min_layer_keep=min_layer_keep, multiple_of=multiple_of,
                                   batch_size=batch_size, progress=show, collector=collector)
        finally:
            if streamed is not None:
                streamed.cleanup()  # the hidden states; width runs resume from the cache, not from them
        if not env.is_main:
            return None
        _save(job, plan, out, force=force, dtype=dtype, progress=progress)
    return plan, job.streamed


@contextmanager
def _guard(job: _Job) -> Iterator[None]:
    """In-memory models get the overflow hooks; the streamed scorer checks in its own observers."""
    if job.streamed:
        yield
        return
    with overflow_guard(job.adapter):
        yield
