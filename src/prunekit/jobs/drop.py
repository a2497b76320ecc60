"""The `drop` job: LLM-Drop end to end (score, choose, drop, save), in memory or layer-streamed, one process
or data-parallel."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prunekit.drop import CRITERIA, llm_drop
from prunekit.engine.sources import LayerSource, ResidentLayers
from prunekit.engine.streamed import StreamedLayers
from prunekit.errors import CheckpointError, PlanError
from prunekit.io.checkpoint import load_model
from prunekit.io.outputs import prepare_output
from prunekit.jobs.common import Job, scoring_job
from prunekit.plans import PruningPlan
from prunekit.repair import REPAIRS, check_repairable, linear_repair
from prunekit.save import save
from prunekit.surgery import mark_drops


def drop_job(model: str, out: str | Path, *, target: str, n: int, consecutive: bool = False,
             iterative: bool = False, calib: str | Path = "c4", samples: int = 16, seq_len: int = 512,
             batch_size: int = 4, dtype: str = "float32", device: str = "cpu", stream: bool | None = None,
             offload_dir: str | Path | None = None, use_cache: bool = True, force: bool = False,
             repair: str = "none", criterion: str = "cosine", prefilter: int | None = 8,
             progress: bool = True) -> PruningPlan | None:
    """Score, choose, save the pruned checkpoint to `out` (rank 0 saves; the plan is returned on rank 0, None
    elsewhere). Options as in `score_job`. `repair="linear"`: fold a training-free linear map into the
    weights before each removed span (`prunekit.repair`; architectures that allow it, in memory or streamed)."""
    if repair not in REPAIRS:
        raise PlanError(f"unknown repair {repair!r}; choose one of {', '.join(REPAIRS)}")
    if criterion not in CRITERIA:
        raise PlanError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    prepare_output(out, force)  # fail before any expensive work
    with scoring_job(model, calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                     device=device, stream=stream, offload_dir=offload_dir, use_cache=use_cache,
                     progress=progress) as (job, factory):
        ad = job.source.adapter
        if repair == "linear":
            check_repairable(ad)
        with _loss_states(job.streamed and criterion != "cosine", offload_dir) as work:
            plan = llm_drop(ad.model, ad, job.calib, target=target, n=n,  # type: ignore[arg-type]
                            consecutive=consecutive, iterative=iterative, batch_size=batch_size,
                            progress=progress, source=str(model), make_scorer=factory, criterion=criterion,
                            prefilter=prefilter, layers=job.source, work_dir=work)
    # Repair and save outside the process group's block: only rank 0 does them, with no collectives.
    if not job.env.is_main:
        return None
    pruned = job.source
    if repair == "linear":
        dense, pruned = _repair_sources(job, model, plan, dtype)
        with _loss_states(job.streamed, offload_dir) as work:
            plan.repair = linear_repair(dense, pruned, plan, job.calib, batch_size=batch_size, work_dir=work,
                                        progress=progress)
        del dense
    save(pruned, job.tokenizer, out, plan, force=force, progress=progress)
    return plan


def _repair_sources(job: Job, model: str, plan: PruningPlan, dtype: str) -> tuple[LayerSource, LayerSource]:
    """(the dense model, the pruned model) for linear repair. The dense model's statistics are one pass, so it
    is streamed from the checkpoint's files when they allow it (no second copy in memory), else loaded. A
    streamed job repairs a fresh streamed view of the checkpoint with the plan's drops marked (layers not
    compacted, so its layer indices and tensor names are the files'); a resident one its pruned model."""
    dense: LayerSource | None = None
    if job.local is not None:
        try:
            dense = StreamedLayers(job.local, dtype=dtype, device=job.device)
        except CheckpointError:  # tensor names that do not follow the module names: load it instead
            dense = None
    if dense is None:
        net, _ = load_model(model, dtype=dtype, device=job.device, tokenizer=False)
        dense = ResidentLayers(net)
    if not job.streamed:
        return dense, job.source
    assert job.local is not None
    view = StreamedLayers(job.local, dtype=dtype, device=job.device)
    mark_drops(view.adapter, plan.dropped)
    return dense, view


@contextmanager
def _loss_states(streamed: bool, offload_dir: str | Path | None) -> Iterator[Path | None]:
    """Where a loss-guided search keeps every layer's calibration inputs: a temporary folder in `offload_dir`
    for a streamed model given one (removed afterwards), else RAM (None)."""
    if not streamed or offload_dir is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="prunekit-loss-", dir=offload_dir) as tmp:
        yield Path(tmp)
