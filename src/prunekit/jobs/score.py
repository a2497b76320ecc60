"""The `score` job: LLM-Drop similarity scores of a model, in memory or layer-streamed, one process or
data-parallel, served from the score cache when it can be."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.drop import SimilarityScores, model_info
from prunekit.jobs.common import scoring_job


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
    with scoring_job(model, calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                     device=device, stream=stream, offload_dir=offload_dir, use_cache=use_cache,
                     progress=progress) as (job, factory):
        scores = factory(True, False).score()
    result = ScoreJobResult(scores, model_info(job.source.adapter, model), job.streamed, factory.cache_hit)
    return result if job.env.is_main else None
