"""The `drop` job: LLM-Drop end to end (score, choose, drop, save), in memory or layer-streamed, one process
or data-parallel."""

from __future__ import annotations

from pathlib import Path

from prunekit.drop import llm_drop
from prunekit.io.outputs import prepare_output
from prunekit.jobs.common import scoring_job
from prunekit.plans import PruningPlan
from prunekit.save import save


def drop_job(model: str, out: str | Path, *, target: str, n: int, consecutive: bool = False,
             iterative: bool = False, calib: str | Path = "c4", samples: int = 16, seq_len: int = 512,
             batch_size: int = 4, dtype: str = "float32", device: str = "cpu", stream: bool | None = None,
             offload_dir: str | Path | None = None, use_cache: bool = True, force: bool = False,
             progress: bool = True) -> PruningPlan | None:
    """Score, choose, save the pruned checkpoint to `out` (rank 0 saves; the plan is returned on rank 0, None
    elsewhere). Options as in `score_job`."""
    prepare_output(out, force)  # fail before any expensive work
    with scoring_job(model, calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                     device=device, stream=stream, offload_dir=offload_dir, use_cache=use_cache,
                     progress=progress) as (job, factory):
        ad = job.source.adapter
        plan = llm_drop(ad.model, ad, job.calib, target=target, n=n,  # type: ignore[arg-type]
                        consecutive=consecutive, iterative=iterative, batch_size=batch_size,
                        progress=progress, source=str(model), make_scorer=factory)
    # Saved outside the process group's block is fine: only rank 0 writes, and it needs no collectives.
    if job.env.is_main:
        save(job.source, job.tokenizer, out, plan, force=force, progress=progress)
    return plan if job.env.is_main else None
