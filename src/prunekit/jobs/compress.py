"""The `compress` job: search depth and width together for a budget, linearly repair the chosen model's removed
sub-layers, save the best checkpoint with its plan and the table and plot of every candidate tried
(`pareto.json`, `pareto.png`), all or nothing. On a model in memory or layer-streamed, in one process or data
parallel under torchrun (each rank passes its share of the calibration batches; rank 0 repairs and saves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prunekit.adapters import ModelAdapter, get_adapter
from prunekit.compress import (
    DEFAULT_PROBE_SAMPLES,
    DEFAULT_SAMPLES,
    Budget,
    CompressResult,
    check_criterion,
    cut,
    memory_estimate,
    parse_budget,
    search_plan,
    write_pareto,
)
from prunekit.compress.stats import CompressStats
from prunekit.engine.memory import STREAM_HEADROOM, available_memory_bytes, checkpoint_bytes, device_free_bytes
from prunekit.engine.sources import LayerSource
from prunekit.errors import PlanError
from prunekit.io.checkpoint import build_skeleton, resolve_model_path
from prunekit.io.outputs import input_paths, prepare_output
from prunekit.jobs.cache import PassCache, ScoreCache
from prunekit.jobs.common import Job, cache_key, distributed, load_job
from prunekit.jobs.dist import DistEnv, resolve_device
from prunekit.jobs.repair import repair_job
from prunekit.plans import PruningPlan
from prunekit.repair import REPAIRS, check_repairable
from prunekit.save import save


def check_compress_options(budget: str, rounds: int, multiple_of: int, probe_samples: int = 0) -> Budget:
    """The parsed budget, or one clear error for any bad option."""
    parsed = parse_budget(budget)
    if probe_samples < 0:
        raise PlanError(f"--probe-samples must be at least 0, got {probe_samples}")
    if rounds < 1:
        raise PlanError(f"--rounds must be at least 1, got {rounds}")
    if multiple_of < 1:
        raise PlanError(f"--multiple-of must be at least 1, got {multiple_of}")
    return parsed


def compress_memory(path: str | Path, dtype: str, device: torch.device, samples: int, seq_len: int,
                    stream: bool | None, skeleton: ModelAdapter | None = None) -> bool:
    """Whether to stream the model at `path` (`stream`, or when None: only when it would not fit in memory),
    after checking that what that way needs (`memory_estimate` of its meta `skeleton`, built here if not
    given) fits: one clear error before any work if not. A model that is not a local checkpoint (a hub id)
    is not checked, and is loaded into memory."""
    weights = checkpoint_bytes(path, dtype)
    if weights is None:
        return bool(stream)  # `load_job` says that streaming needs a local checkpoint
    est = memory_estimate(skeleton or get_adapter(build_skeleton(resolve_model_path(path), dtype)), samples, seq_len)
    stats = est["fishers"] + est["largest_gram"]  # the other Grams can wait on disk

    def needs(streamed: bool) -> tuple[int, int]:
        """(host bytes, device bytes)."""
        held = est["layer"] + est["head"] if streamed else int(weights * STREAM_HEADROOM)
        on_device = held + est["weights"] + est["logits"] + (est["layer_stats"] if device.type != "cpu" else 0)
        host = stats + (0 if streamed else est["states"]) + (on_device if device.type == "cpu" else 0)
        return host, on_device

    def fits(streamed: bool) -> bool:
        host, on_device = needs(streamed)
        return host <= available_memory_bytes() and on_device <= device_free_bytes(device)

    streamed = stream if stream is not None else not fits(False)
    if not fits(streamed):
        host, on_device = needs(streamed)
        need, free, where = ((host, available_memory_bytes(), "memory") if host > available_memory_bytes()
                             else (on_device, device_free_bytes(device), f"{device} memory"))
        gib = 2 ** 30
        held = "one layer" if streamed else f"{weights / gib:.1f} GiB of weights"
        raise PlanError(
            f"compress needs at least {need / gib:.1f} GiB of {where} ({held}{', streamed' if streamed else ''}, "
            f"{stats / gib:.1f} GiB of float64 statistics, {est['logits'] / gib:.1f} GiB of logits) but "
            f"{free / gib:.1f} GiB is free; use a machine with more memory"
            f"{'' if streamed else ', --stream'}, or fewer --samples or a smaller --seq-len or --dtype")
    return streamed


def compress_job(model: str, out: str | Path, *, budget: str, rounds: int = 2, multiple_of: int = 64,
                 calib: str | Path = "c4", samples: int = DEFAULT_SAMPLES, seq_len: int = 512, batch_size: int = 4,
                 criterion: str = "loss", repair: str | None = None, dtype: str = "float32", device: str = "cpu",
                 stream: bool | None = None, offload_dir: str | Path | None = None, force: bool = False,
                 progress: bool = True, correct: bool = True,
                 probe_samples: int = DEFAULT_PROBE_SAMPLES, use_cache: bool = True) -> CompressResult | None:
    """Load (in memory, or layer-streamed: `stream`, default only when it would not fit), search
    (`prunekit.compress`), repair the chosen model's removed spans (`repair`: "linear", "none", or None for
    linear where the architecture takes it; `prunekit.repair`, each map kept only where it lowers the
    held-out calibration loss), save to `out`. `correct`: the search's last step, the error correction of
    the chosen model's kept projections (`prunekit.compress.correct`). `probe_samples`: calibration
    sequences over which each sub-layer's cut alone is measured (`prunekit.compress.measure`; 0: no
    measured candidates). `offload_dir`: where spilled Grams
    and a streamed run's hidden states go (default the system's temporary directory). `use_cache`: each
    statistics pass is kept in the score cache (`jobs.cache.PassCache`; a local checkpoint only). Returns the
    result on rank 0, None on the other ranks of a torchrun job."""
    b = check_compress_options(budget, rounds, multiple_of, probe_samples)
    check_criterion(criterion)
    if repair is not None and repair not in REPAIRS:
        raise PlanError(f"unknown repair {repair!r}; choose one of {', '.join(REPAIRS)}")
    path = resolve_model_path(model)
    skeleton = get_adapter(build_skeleton(path, dtype))  # shapes only: the checks before any work
    if repair == "linear":
        check_repairable(skeleton)
    streamed = compress_memory(path, dtype, resolve_device(device, DistEnv.from_env()), samples, seq_len, stream,
                               skeleton)
    dest = prepare_output(out, force, inputs=input_paths(model, calib))  # fail before any expensive work
    with distributed(device, offload_dir) as (env, dev):
        job = load_job(model, calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                       env=env, device=dev, stream=streamed)
        # `search_plan` checks the budget against the model (an impossible one fails) before any pass.
        store = _stats_store(job, use_cache, {"batch_size": batch_size, "dtype": dtype})
        result = search_plan(job.source, None, job.calib, b, rounds=rounds, multiple_of=multiple_of,
                             batch_size=batch_size, criterion=criterion, progress=progress and env.is_main,
                             source=str(model), sums=job.sums, work_dir=offload_dir, correct=correct,
                             probe_samples=probe_samples, store=store)
        cut(job.source, result.plan)
    # Repair and save outside the process group's block: only rank 0 does them, with no collectives.
    if not env.is_main:
        return None
    pruned = _repair(job, model, result.plan, repair, dtype, batch_size, offload_dir, progress)
    save(pruned, job.tokenizer, dest, result.plan, progress=progress,
         extras=lambda folder: write_pareto(result, folder))
    return result


def _stats_store(job: Job, use_cache: bool, options: dict[str, Any]) -> PassCache | None:
    """The cache of this run's statistics passes: keyed by the model files, this rank's calibration tokens
    and the options every pass depends on (the search names each pass by the options its model follows
    from, so the dense model's pass serves every budget); a local checkpoint only: its files identify it."""
    if not use_cache or job.local is None:
        return None
    return PassCache(ScoreCache(), cache_key(job, {"kind": "compress", **options}), CompressStats, "compress",
                     info={"model": job.spec, "calibration": job.shard.describe()})


def _repair(job: Job, model: str, plan: PruningPlan, repair: str | None, dtype: str, batch_size: int,
            offload_dir: str | Path | None, progress: bool) -> LayerSource:
    """The source to save: the chosen model with its removed spans linearly repaired, unless `repair` is
    "none" or (by default) the architecture cannot take the fold; the plan says which."""
    if repair is None and job.source.adapter.spec.output_norms:
        plan.repair = {"method": "none", "reason": "sub-layer outputs are normalised before the residual add, "
                                                   "so a linear map cannot be folded into them"}
        return job.source
    if repair == "none":
        return job.source
    return repair_job(job, model, plan, dtype=dtype, batch_size=batch_size, offload_dir=offload_dir,
                      progress=progress)
