"""The `compress` job: search depth and width together for a budget, save the best checkpoint with its plan
and the table and plot of every candidate tried (`pareto.json`, `pareto.png`), all or nothing. In one process
or data parallel under torchrun (each rank passes its share of the calibration batches; rank 0 saves)."""

from __future__ import annotations

from pathlib import Path

import torch

from prunekit.adapters import get_adapter
from prunekit.compress import Budget, CompressResult, compress, parse_budget, write_pareto
from prunekit.compress.search import check_criterion, memory_estimate
from prunekit.engine.memory import STREAM_HEADROOM, available_memory_bytes, checkpoint_bytes, device_free_bytes
from prunekit.errors import PlanError
from prunekit.io.checkpoint import build_skeleton, resolve_model_path
from prunekit.io.outputs import prepare_output
from prunekit.jobs.common import distributed, load_job
from prunekit.jobs.dist import AllReduceSums, DistEnv, resolve_device
from prunekit.save import save


def check_compress_options(budget: str, rounds: int, multiple_of: int) -> Budget:
    """The parsed budget, or one clear error for any bad option."""
    parsed = parse_budget(budget)
    if rounds < 1:
        raise PlanError(f"--rounds must be at least 1, got {rounds}")
    if multiple_of < 1:
        raise PlanError(f"--multiple-of must be at least 1, got {multiple_of}")
    return parsed


def check_compress_memory(model: str | Path, dtype: str, device: torch.device, batch_size: int,
                          seq_len: int) -> None:
    """One clear error, before any work, when the model in memory (a backward pass needs the whole graph, so
    no streaming) plus what the search holds (`memory_estimate`) would not fit in free memory. A model that
    is not a local checkpoint (a hub id) is not checked."""
    weights = checkpoint_bytes(model, dtype)
    if weights is None:
        return
    est = memory_estimate(get_adapter(build_skeleton(resolve_model_path(model), dtype)), batch_size, seq_len)
    on_device = int(weights * STREAM_HEADROOM) + est["weights"] + est["logits"]
    stats = est["fishers"] + est["largest_gram"]  # the other Grams can wait on disk
    host = stats + (on_device if device.type == "cpu" else 0)
    for need, free, where in ((host, available_memory_bytes(), "memory"),
                              (on_device, device_free_bytes(device), f"{device} memory")):
        if need > free:
            gib = 2 ** 30
            raise PlanError(
                f"compress needs at least {need / gib:.1f} GiB of {where} ({weights / gib:.1f} GiB of weights, "
                f"{stats / gib:.1f} GiB of float64 statistics, {est['logits'] / gib:.1f} GiB of logits) but "
                f"{free / gib:.1f} GiB is free; it cannot stream (a backward pass needs the whole model): use a "
                "machine with more memory, or a smaller --batch-size or --dtype")


def compress_job(model: str, out: str | Path, *, budget: str, rounds: int = 2, multiple_of: int = 64,
                 calib: str | Path = "c4", samples: int = 16, seq_len: int = 512, batch_size: int = 4,
                 criterion: str = "loss", dtype: str = "float32", device: str = "cpu", force: bool = False,
                 progress: bool = True) -> CompressResult | None:
    """Load, search (`prunekit.compress`), save to `out`. The model must fit in memory (the statistics need
    a backward pass through the whole graph, which a layer-streamed model cannot give). Returns the result on
    rank 0, None on the other ranks of a torchrun job."""
    b = check_compress_options(budget, rounds, multiple_of)
    check_criterion(criterion)
    check_compress_memory(model, dtype, resolve_device(device, DistEnv.from_env()), batch_size, seq_len)
    prepare_output(out, force)  # fail before any expensive work
    with distributed(device, None) as (env, dev):
        job = load_job(model, calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                       env=env, device=dev, stream=False)
        ad = job.source.adapter
        sums = AllReduceSums(env, dev, batch_size) if env.is_distributed else None
        # `compress` checks the budget against the model (an impossible one fails) before any pass.
        result = compress(ad.model, ad, job.calib, b, rounds=rounds, multiple_of=multiple_of,
                          batch_size=batch_size, criterion=criterion, progress=progress and env.is_main,
                          source=str(model), sums=sums)
        if env.is_main:
            save(job.source, job.tokenizer, out, result.plan, force=force, progress=progress,
                 extras=lambda folder: write_pareto(result, folder))
    return result if env.is_main else None
