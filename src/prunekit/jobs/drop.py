"""The `drop` job: LLM-Drop end to end (score, choose, drop, save), in memory or layer-streamed, one process
or data-parallel."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prunekit.drop import CRITERIA, llm_drop
from prunekit.engine.sources import ResidentLayers
from prunekit.errors import PlanError
from prunekit.io.checkpoint import load_model
from prunekit.io.outputs import prepare_output
from prunekit.jobs.common import scoring_job
from prunekit.plans import PruningPlan
from prunekit.repair import REPAIRS, check_repairable, linear_repair
from prunekit.save import save


def drop_job(model: str, out: str | Path, *, target: str, n: int, consecutive: bool = False,
             iterative: bool = False, calib: str | Path = "c4", samples: int = 16, seq_len: int = 512,
             batch_size: int = 4, dtype: str = "float32", device: str = "cpu", stream: bool | None = None,
             offload_dir: str | Path | None = None, use_cache: bool = True, force: bool = False,
             repair: str = "none", criterion: str = "cosine", prefilter: int | None = 8,
             progress: bool = True) -> PruningPlan | None:
    """Score, choose, save the pruned checkpoint to `out` (rank 0 saves; the plan is returned on rank 0, None
    elsewhere). Options as in `score_job`. `repair="linear"`: fold a training-free linear map into the
    weights before each removed span (`prunekit.repair`; in-memory runs of architectures that allow it)."""
    if repair not in REPAIRS:
        raise PlanError(f"unknown repair {repair!r}; choose one of {', '.join(REPAIRS)}")
    if repair == "linear" and stream:
        raise PlanError("--repair linear needs the model in memory; run without --stream")
    if criterion not in CRITERIA:
        raise PlanError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    prepare_output(out, force)  # fail before any expensive work
    with scoring_job(model, calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                     device=device, stream=stream, offload_dir=offload_dir, use_cache=use_cache,
                     progress=progress) as (job, factory):
        ad = job.source.adapter
        if repair == "linear":
            if not isinstance(job.source, ResidentLayers):
                raise PlanError("--repair linear needs the model in memory, but it would not fit; run without it")
            check_repairable(ad)
        with _loss_states(job.streamed and criterion != "cosine", offload_dir) as work:
            plan = llm_drop(ad.model, ad, job.calib, target=target, n=n,  # type: ignore[arg-type]
                            consecutive=consecutive, iterative=iterative, batch_size=batch_size,
                            progress=progress, source=str(model), make_scorer=factory, criterion=criterion,
                            prefilter=prefilter, layers=job.source, work_dir=work)
    if repair == "linear" and job.env.is_main:
        dense, _ = load_model(model, dtype=dtype, device=job.device, tokenizer=False)
        plan.repair = linear_repair(dense, ad.model, plan, job.calib, batch_size=batch_size, progress=progress)
        del dense
    # Saved outside the process group's block is fine: only rank 0 writes, and it needs no collectives.
    if job.env.is_main:
        save(job.source, job.tokenizer, out, plan, force=force, progress=progress)
    return plan if job.env.is_main else None


@contextmanager
def _loss_states(streamed: bool, offload_dir: str | Path | None) -> Iterator[Path | None]:
    """Where a loss-guided search keeps every layer's calibration inputs: a temporary folder in `offload_dir`
    for a streamed model given one (removed afterwards), else RAM (None)."""
    if not streamed or offload_dir is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="prunekit-loss-", dir=offload_dir) as tmp:
        yield Path(tmp)
