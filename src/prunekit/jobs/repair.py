"""Linear repair inside a job (`drop --repair linear`, and `compress` by default): where the dense model's
statistics come from, which source takes the folds, and what is saved afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prunekit.engine.sources import LayerSource, ResidentLayers
from prunekit.engine.streamed import StreamedLayers
from prunekit.errors import CheckpointError
from prunekit.io.checkpoint import load_model
from prunekit.io.outputs import scratch_dir
from prunekit.jobs.common import Job
from prunekit.plans import PruningPlan
from prunekit.repair import linear_repair, removed_spans
from prunekit.surgery import mark_drops


def repair_job(job: Job, model: str, plan: PruningPlan, *, dtype: str, batch_size: int,
               offload_dir: str | Path | None, progress: bool) -> LayerSource:
    """Fold the linear repair of `plan`'s removed spans into the job's pruned model, record it in
    `plan.repair`, and return the source to save (the job's own in memory; a streamed view carrying every
    edit, the job's and the folds, as overrides). A plan that removes no sub-layer is left as it is."""
    # Spans end at the last dropped layer, so the plan alone says whether there is any (none when it drops
    # nothing, or only a run that starts the model), before the dense model is opened or loaded.
    if not plan.dropped or not removed_spans(plan, 1 + max(d.layer for d in plan.dropped)):
        return job.source
    dense, pruned = _repair_sources(job, model, plan, dtype)
    with loss_states(job.streamed, offload_dir) as work:
        plan.repair = linear_repair(dense, pruned, plan, job.calib, batch_size=batch_size, work_dir=work,
                                    progress=progress)
    return pruned


def _repair_sources(job: Job, model: str, plan: PruningPlan, dtype: str) -> tuple[LayerSource, LayerSource]:
    """(the dense model, the pruned model) for linear repair. The dense model's statistics are one pass, so it
    is streamed from the checkpoint's files when they allow it (no second copy in memory), else loaded. A
    streamed job repairs a fresh streamed view of the checkpoint with the plan's drops marked and the job's
    edits as overrides (layers not compacted and widths not cut, so its layer indices and tensor names are
    the files'; units a plan removes are zeroed in those edits, which gives the cut model's logits); a
    resident job its pruned model."""
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
    assert job.local is not None and isinstance(job.source, StreamedLayers)
    view = StreamedLayers(job.local, dtype=dtype, device=job.device)
    mark_drops(view.adapter, plan.dropped)
    view.overrides = dict(job.source.overrides)
    view.commit()
    return dense, view


@contextmanager
def loss_states(streamed: bool, offload_dir: str | Path | None) -> Iterator[Path | None]:
    """Where a loss-guided pass keeps every layer's calibration inputs: a temporary folder in `offload_dir`
    for a streamed model given one (removed afterwards), else RAM (None)."""
    if not streamed or offload_dir is None:
        yield None
        return
    with scratch_dir("loss", offload_dir) as tmp:
        yield tmp
