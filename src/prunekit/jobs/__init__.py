"""Jobs: what the CLI runs, composed from loading, the engine, the algorithms and saving. Each works in memory
or layer-streamed, in one process or under torchrun (rank 0 writes)."""

from prunekit.jobs.compress import compress_job
from prunekit.jobs.drop import drop_job
from prunekit.jobs.evaluate import bench_job, eval_job
from prunekit.jobs.heal import heal_checkpoint
from prunekit.jobs.score import ScoreJobResult, score_job
from prunekit.jobs.width import width_job

__all__ = ["ScoreJobResult", "bench_job", "compress_job", "drop_job", "eval_job", "heal_checkpoint", "score_job",
           "width_job"]
