"""The `drop` job: LLM-Drop end to end (score, choose, drop, save), in memory or layer-streamed, one process
or data-parallel."""

from __future__ import annotations

from pathlib import Path

from prunekit.drop import CRITERIA, choose_drops
from prunekit.errors import PlanError
from prunekit.io.outputs import input_paths, prepare_output
from prunekit.jobs.common import scoring_job
from prunekit.jobs.experts import check_expert_options, expert_drop_plan
from prunekit.jobs.repair import loss_states, repair_job
from prunekit.plans import PruningPlan
from prunekit.repair import REPAIRS, check_repairable
from prunekit.save import save
from prunekit.surgery import apply_plan


def drop_job(model: str, out: str | Path, *, target: str, n: int, consecutive: bool = False,
             iterative: bool = False, calib: str | Path = "c4", samples: int = 16, seq_len: int = 512,
             batch_size: int = 4, dtype: str = "float32", device: str = "cpu", stream: bool | None = None,
             offload_dir: str | Path | None = None, use_cache: bool = True, force: bool = False,
             repair: str = "none", criterion: str = "cosine", prefilter: int | None = 8,
             expert_score: str = "router", progress: bool = True) -> PruningPlan | None:
    """Score, choose, save the pruned checkpoint to `out` (rank 0 saves; the plan is returned on rank 0, None
    elsewhere). Options as in `score_job`. `repair="linear"`: fold a training-free linear map into the
    weights before each removed span (`prunekit.repair`; architectures that allow it, in memory or streamed).
    `target="expert"`: remove the `n` least important experts of every MoE layer, ranked by `expert_score`
    (`prunekit.moe`)."""
    if target == "expert":
        check_expert_options(consecutive=consecutive, iterative=iterative, criterion=criterion, repair=repair)
    if repair not in REPAIRS:
        raise PlanError(f"unknown repair {repair!r}; choose one of {', '.join(REPAIRS)}")
    if criterion not in CRITERIA:
        raise PlanError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    dest = prepare_output(out, force, inputs=input_paths(model, calib))  # fail before any expensive work
    with scoring_job(model, calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                     device=device, stream=stream, offload_dir=offload_dir, use_cache=use_cache,
                     progress=progress) as (job, factory):
        ad = job.source.adapter
        if repair == "linear":
            check_repairable(ad)
        if target == "expert":
            plan = expert_drop_plan(job, n=n, expert_score=expert_score, batch_size=batch_size, progress=progress)
        else:
            with loss_states(job.streamed and criterion != "cosine", offload_dir) as work:
                plan = choose_drops(ad.model, ad, job.calib, target=target, n=n,  # type: ignore[arg-type]
                                    consecutive=consecutive, iterative=iterative, batch_size=batch_size,
                                    progress=progress, source=str(model), make_scorer=factory,
                                    criterion=criterion, prefilter=prefilter, layers=job.source, work_dir=work)
        apply_plan(ad, plan)
    # Repair and save outside the process group's block: only rank 0 does them, with no collectives.
    if not job.env.is_main:
        return None
    pruned = job.source
    if repair == "linear":
        pruned = repair_job(job, model, plan, dtype=dtype, batch_size=batch_size, offload_dir=offload_dir,
                            progress=progress)
    save(pruned, job.tokenizer, dest, plan, progress=progress)
    return plan
