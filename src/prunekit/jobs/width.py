"""The `width` job: TransAct width pruning end to end, in memory or layer-streamed, one process or
data-parallel, every shot's statistics cached (an interrupted run resumes at its first unfinished shot)."""

from __future__ import annotations

from pathlib import Path

from prunekit.io.outputs import input_paths, prepare_output
from prunekit.jobs.common import distributed, load_job, width_collector
from prunekit.moe.choose import is_moe_model
from prunekit.moe.slim import check_slim_options, slim_experts
from prunekit.plans import PruningPlan
from prunekit.save import save
from prunekit.width import check_width_options, width_prune


def width_job(model: str, out: str | Path, *, mlp_keep: float | int | None = None,
              heads_keep: float | int | None = None, mode: str = "uniform", shots: int = 8,
              scorer: str = "activation", head_mode: str = "kv-groups", min_layer_keep: float = 0.1,
              multiple_of: int = 64, calib: str | Path = "c4", samples: int = 16, seq_len: int = 512,
              batch_size: int = 4, dtype: str = "float32", device: str = "cpu", stream: bool | None = None,
              offload_dir: str | Path | None = None, use_cache: bool = True, force: bool = False,
              progress: bool = True) -> tuple[PruningPlan, bool] | None:
    """Collect activation statistics, plan the shots, save the narrowed checkpoint to `out` (rank 0 saves).
    Returns (plan, streamed) on rank 0, None elsewhere. Options as in `width.width_prune` and `score_job`.

    Streamed, the shots narrow a meta-device skeleton with the ordinary surgery and every pass reads each
    layer from the files already cut to the widths so far; the plan equals the in-memory one (tests)."""
    check_width_options(mlp_keep=mlp_keep, heads_keep=heads_keep, mode=mode, shots=shots, scorer=scorer,
                        head_mode=head_mode, min_layer_keep=min_layer_keep, multiple_of=multiple_of)
    dest = prepare_output(out, force, inputs=input_paths(model, calib))  # fail before any expensive work
    with distributed(device, offload_dir) as (env, dev):
        job = load_job(model, calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                       env=env, device=dev, stream=stream)
        if is_moe_model(job.source.adapter):
            check_slim_options(heads_keep=heads_keep, mode=mode, scorer=scorer)
            plan = slim_experts(job.source, job.source.adapter, job.shard, mlp_keep=mlp_keep,  # type: ignore[arg-type]
                                shots=shots, multiple_of=multiple_of, batch_size=batch_size, sums=job.sums,
                                progress=progress and env.is_main)
            plan.calibration = job.calib.describe()
            if env.is_main:
                save(job.source, job.tokenizer, dest, plan, progress=progress)
            return (plan, job.streamed) if env.is_main else None
        collector, inner = width_collector(job, scorer=scorer, batch_size=batch_size, dtype=dtype,
                                           offload_dir=offload_dir, use_cache=use_cache, progress=progress)
        ad = job.source.adapter
        try:
            plan = width_prune(ad.model, ad, job.calib, mlp_keep=mlp_keep, heads_keep=heads_keep, mode=mode,  # type: ignore[arg-type]
                               shots=shots, scorer=scorer, head_mode=head_mode,  # type: ignore[arg-type]
                               min_layer_keep=min_layer_keep, multiple_of=multiple_of, batch_size=batch_size,
                               progress=progress and env.is_main, collector=collector, source=str(model))
        finally:
            inner.cleanup()  # the hidden states; width runs resume from the cache, not from them
        if env.is_main:
            save(job.source, job.tokenizer, dest, plan, progress=progress)
    return (plan, job.streamed) if env.is_main else None
