"""`prunekit compress`: the best model for a budget, depth and width searched together."""

from __future__ import annotations

import argparse
from typing import Any

from prunekit.cli.options import add_calib, add_model, add_output, emit, positive_int, progress
from prunekit.compress import DEFAULT_PROBE_SAMPLES, DEFAULT_SAMPLES


def register(sub: Any) -> None:
    p = sub.add_parser(
        "compress",
        help="search depth (attention/MLP/block drops) and width (MLP channels, KV groups) together for a "
             "parameter or KV-cache budget and save the best model, with a Pareto table and plot",
        description="Estimate from one forward+backward pass over calibration text how much the loss rises for "
                    "every way of narrowing or removing each attention and MLP sub-layer (with a least-squares "
                    "refit of what remains), spend the budget where it costs least, try several candidate "
                    "families (mixed, depth only, width only, uniform width, and mixed in several rounds), score "
                    "each by the loss on held-out calibration samples, refit the best one's projections against "
                    "the dense model's residual stream, and save it. Training-free; a model "
                    "that does not fit in memory is streamed one layer at a time (the backward pass too).",
    )
    add_model(p)
    p.add_argument("--budget", required=True, metavar="KEY=FRACTION",
                   help="what may remain of the dense model: params=0.8 (80%% of the parameters) or kv=0.5 (half "
                        "the KV-cache bytes per token)")
    p.add_argument("--rounds", type=positive_int, default=2,
                   help="spend the budget in this many rounds, re-taking the statistics in between (default 2)")
    p.add_argument("--multiple-of", type=positive_int, default=64, metavar="M",
                   help="MLP widths stay multiples of M, which inference kernels run fast (default 64)")
    p.add_argument("--criterion", choices=("loss", "kl"), default="loss",
                   help="choose among the candidates by the loss on held-out calibration samples (default), or by "
                        "the KL divergence there from the dense model's next-token distributions")
    p.add_argument("--repair", choices=("none", "linear"), default=None,
                   help="fold a training-free linear map for each removed span of sub-layers of the chosen model "
                        "into the sub-layer before it, kept only where it lowers the held-out calibration loss "
                        "(default: linear where the architecture takes it, e.g. not Gemma 3)")
    p.add_argument("--correct", action=argparse.BooleanOptionalAction, default=True,
                   help="refit the chosen model's kept output projections, layer by layer, against the dense "
                        "model's residual stream, kept only where it lowers the held-out calibration loss "
                        "(default; --no-correct skips it: about 4 forward passes of the calibration data)")
    p.add_argument("--probe-samples", type=int, default=DEFAULT_PROBE_SAMPLES, metavar="N",
                   help="calibration sequences over which every sub-layer is cut alone and its loss increase "
                        "measured, for candidates allocated on measured rather than estimated costs; 8 is a good "
                        f"value (default {DEFAULT_PROBE_SAMPLES}: none, they rarely won and cost 25-50%% more time)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="load one decoder layer at a time from the safetensors files, forward and backward "
                        "(--no-stream: whole model in memory; default: stream only when it would not fit)")
    p.add_argument("--offload-dir", default=None,
                   help="directory for the input Grams that do not fit in memory and a streamed run's hidden "
                        "states (default: the system's temporary directory); removed when done")
    add_calib(p, samples=DEFAULT_SAMPLES)
    add_output(p)
    p.set_defaults(func=cmd_compress)


def cmd_compress(args: argparse.Namespace) -> int:
    from prunekit.jobs.compress import compress_job
    from prunekit.losses import loss_perplexity

    result = compress_job(str(args.model), args.out, budget=args.budget, rounds=args.rounds,
                          multiple_of=args.multiple_of, calib=args.calib, samples=args.samples,
                          seq_len=args.seq_len, batch_size=args.batch_size, criterion=args.criterion,
                          repair=args.repair, dtype=args.dtype, device=args.device, stream=args.stream,
                          offload_dir=args.offload_dir, force=args.force, progress=progress(args),
                          correct=args.correct, probe_samples=args.probe_samples)
    if result is None:  # not rank 0 of a torchrun job
        return 0
    chosen = next(c for c in result.candidates if c["name"] == result.chosen)
    summary = {"out": str(args.out), "method": "compress", "budget": args.budget, "chosen": result.chosen,
               "removed_params": chosen["removed_params"], "removed_kv": chosen["removed_kv"],
               "check_ppl": chosen["check_ppl"],
               "dropped": [f"{d.module}@{d.layer}" for d in result.plan.dropped],
               "narrowed_layers": sorted(result.plan.widths)}
    corr = result.plan.options.get("correction")
    if corr is not None:
        summary["correction"] = {k: corr[k] for k in ("applied", "check_value_uncorrected", "check_value")}
    rep = result.plan.repair
    if rep and rep.get("spans"):
        summary["repair"] = {"check_ppl_unrepaired": loss_perplexity(rep["check_loss_unrepaired"]),
                             "check_ppl": loss_perplexity(rep["check_loss"]),
                             "applied": sum(s["applied"] for s in rep["spans"]), "spans": len(rep["spans"])}
    return emit(summary)
