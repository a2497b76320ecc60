"""Expert drop inside the `drop` job (`--target expert`): expert statistics over the calibration text through
the one runner, totalled over processes, then the plan that keeps all but the n least important experts of
every MoE layer. The drop job applies and saves it like any plan."""

from __future__ import annotations

from prunekit.drop import model_info
from prunekit.errors import OptionError
from prunekit.jobs.common import Job
from prunekit.moe.choose import check_expert_drop, choose_expert_drops
from prunekit.moe.stats import collect_expert_stats
from prunekit.plans import PruningPlan


def check_expert_options(*, consecutive: bool, iterative: bool, criterion: str, repair: str) -> None:
    """`--target expert` ranks experts once by their statistics: the layer-drop options do not apply."""
    if consecutive or iterative or criterion != "cosine" or repair != "none":
        raise OptionError("--target expert takes none of --consecutive, --iterative, --criterion, --repair "
                          "(experts are ranked once by --expert-score)")


def expert_drop_plan(job: Job, *, n: int, expert_score: str, batch_size: int, progress: bool) -> PruningPlan:
    """The expert-drop plan of the job's model: statistics over this process's calibration shard, totalled."""
    ad = check_expert_drop(job.source.adapter, n, expert_score)
    stats = collect_expert_stats(job.source, job.shard, adapter=ad, batch_size=batch_size, sums=job.sums,
                                 progress=progress and job.env.is_main)
    plan = choose_expert_drops(ad, stats, n, expert_score)
    plan.calibration = job.calib.describe()
    plan.model = {**model_info(ad, job.spec), **plan.model}
    return plan
