"""The `compress` job: search depth and width together for a budget, save the best checkpoint with its plan
and the table and plot of every candidate tried (`pareto.json`, `pareto.png`), all or nothing."""

from __future__ import annotations

from pathlib import Path

from prunekit.compress import Budget, CompressResult, compress, parse_budget, write_pareto
from prunekit.compress.search import check_criterion
from prunekit.engine.memory import should_stream
from prunekit.errors import DistributedError, PlanError
from prunekit.io.checkpoint import resolve_model_path
from prunekit.io.outputs import prepare_output
from prunekit.jobs.common import load_job
from prunekit.jobs.dist import DistEnv, check_device
from prunekit.save import save


def check_compress_options(budget: str, rounds: int, multiple_of: int) -> Budget:
    """The parsed budget, or one clear error for any bad option."""
    parsed = parse_budget(budget)
    if rounds < 1:
        raise PlanError(f"--rounds must be at least 1, got {rounds}")
    if multiple_of < 1:
        raise PlanError(f"--multiple-of must be at least 1, got {multiple_of}")
    return parsed


def compress_job(model: str, out: str | Path, *, budget: str, rounds: int = 2, multiple_of: int = 64,
                 calib: str | Path = "c4", samples: int = 16, seq_len: int = 512, batch_size: int = 4,
                 criterion: str = "loss", dtype: str = "float32", device: str = "cpu", force: bool = False,
                 progress: bool = True) -> CompressResult:
    """Load, search (`prunekit.compress`), save to `out`. The model must fit in memory (the statistics need
    a backward pass) and the job runs in one process."""
    b = check_compress_options(budget, rounds, multiple_of)
    check_criterion(criterion)
    env = DistEnv.from_env()
    if env.is_distributed:
        raise DistributedError("compress runs in one process (its statistics need a backward pass through the "
                               "whole model); run it without torchrun")
    dev = check_device(device)
    if should_stream(resolve_model_path(model), dtype, dev):
        raise PlanError("compress needs the model in memory (a backward pass), but it would not fit in free "
                        "memory; use a smaller --dtype or a machine with more memory")
    prepare_output(out, force)  # fail before any expensive work
    job = load_job(model, calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                   env=env, device=dev, stream=False)
    ad = job.source.adapter
    # `compress` checks the budget against the model (an impossible one fails) before any pass.
    result = compress(ad.model, ad, job.calib, b, rounds=rounds, multiple_of=multiple_of, batch_size=batch_size,
                      criterion=criterion, progress=progress, source=str(model))
    save(job.source, job.tokenizer, out, result.plan, force=force, progress=progress,
         extras=lambda folder: write_pareto(result, folder))
    return result
