"""`prunekit compress --stream` against the same command in memory: the streamed search must choose the same
model with the same weights. Each run is a separate process, exactly `prunekit compress MODEL --budget B` (default
calibration: c4's calibration half, 16 x 512 tokens) with `--no-stream` or `--stream`, so that its own peak RSS
and wall time are measured. Then both checkpoints are loaded and compared: the chosen candidate and plan, every
candidate's held-out check loss, the largest logit difference on a held-out window, and wiki perplexity on the
evaluation half (never seen in calibration). The runs are sequential, one round each: the time ratio is
indicative (this 2-core machine is noisy), the peak RSS and the equalities are not.

    .venv/bin/python benchmarks/bench_compress_stream.py [--model smollm2-135m] [--budget params=0.8]
        [--samples 16] [--modes memory,stream] [--windows 10]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODES = ("memory", "stream")


def child(a: argparse.Namespace) -> None:
    """One compress run in this process; its time and peak RSS to `a.out`/run.json (outside the checkpoint)."""
    from prunekit.jobs.compress import compress_job

    t0 = time.time()
    result = compress_job(a.model, Path(a.out) / "model", budget=a.budget, stream=a.child == "stream",
                          samples=a.samples, progress=False)
    assert result is not None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    (Path(a.out) / "run.json").write_text(json.dumps({
        "seconds": round(time.time() - t0, 1), "peak_rss_gib": round(peak / 2**30, 2), "chosen": result.chosen,
        "candidates": result.candidates, "plan": _plan_summary(result.plan.to_json())}))


def _plan_summary(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan as compared and reported: its options, drops, and the units kept per layer (the full index
    lists are in the checkpoint's own plan)."""
    widths = {i: {k: len(v) for k, v in w.items()} for i, w in plan["widths"].items()}
    return {"options": plan["options"], "dropped": plan["dropped"], "widths": widths,
            "kept_sha256": hashlib.sha256(json.dumps(plan["widths"], sort_keys=True).encode()).hexdigest()}


def compare(a: argparse.Namespace, runs: dict[str, dict[str, Any]], work: Path) -> dict[str, Any]:
    """Wiki perplexity of each run's checkpoint and, when both modes ran, how far apart they are."""
    import prunekit

    tok = prunekit.load_model(work / a.modes[0] / "model")[1]
    windows = prunekit.eval_windows(tok, "wiki", a.windows, 1024)
    out: dict[str, Any] = {"wiki_ppl": {}, "eval_windows": [a.windows, 1024]}
    logits = {}
    for m in a.modes:
        model = prunekit.load_model(work / m / "model")[0]
        out["wiki_ppl"][m] = prunekit.perplexity(model, windows, progress=False)["perplexity"]
        with torch.no_grad():
            logits[m] = model(input_ids=windows[:1]).logits
        del model
    if len(a.modes) < 2:
        return out
    mem, st = runs["memory"], runs["stream"]
    loss_gap = max(abs(x["check_loss"] - y["check_loss"]) / abs(y["check_loss"])
                   for x, y in zip(st["candidates"], mem["candidates"], strict=True))
    return {
        **out,
        "same_chosen": st["chosen"] == mem["chosen"],
        "same_plan": (st["plan"]["dropped"], st["plan"]["kept_sha256"]) == (mem["plan"]["dropped"],
                                                                             mem["plan"]["kept_sha256"]),
        "max_rel_check_loss_gap": loss_gap,
        "max_abs_logit_diff": float((logits["stream"] - logits["memory"]).abs().max()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budget", default="params=0.8")
    p.add_argument("--windows", type=int, default=10, help="held-out wiki windows of 1024 tokens")
    p.add_argument("--samples", type=int, default=16, help="calibration sequences of 512 tokens (default 16, "
                   "compress's own default)")
    p.add_argument("--modes", default=",".join(MODES), help="memory,stream (default both) or one of them")
    p.add_argument("--json", default="benchmarks/results/compress_stream.json")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.modes = [m for m in MODES if m in a.modes.split(",")]
    if a.child:
        child(a)
        return
    with tempfile.TemporaryDirectory(prefix="bench-compress-stream-") as tmp:
        work = Path(tmp)
        runs = {}
        for mode in a.modes:
            subprocess.run([sys.executable, __file__, "--model", a.model, "--budget", a.budget, "--child", mode,
                            "--samples", str(a.samples), "--out", str(work / mode)], check=True)
            runs[mode] = json.loads((work / mode / "run.json").read_text())
            print(f"{mode}: {runs[mode]['seconds']:.0f} s, peak RSS {runs[mode]['peak_rss_gib']} GiB, "
                  f"chosen {runs[mode]['chosen']}", flush=True)
        out = {"model": a.model, "budget": a.budget, "samples": a.samples,
               "runs": {m: {k: v for k, v in r.items() if k != "candidates"} for m, r in runs.items()},
               **compare(a, runs, work)}
    if len(a.modes) == 2:
        out["stream_over_memory_seconds"] = out["runs"]["stream"]["seconds"] / out["runs"]["memory"]["seconds"]
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{a.model} compress --budget {a.budget}")
    print(f"{'mode':8s} {'seconds':>8s} {'peak RSS GiB':>13s} {'wiki ppl':>9s}  chosen")
    for m in a.modes:
        r = out["runs"][m]
        print(f"{m:8s} {r['seconds']:8.0f} {r['peak_rss_gib']:13.2f} {out['wiki_ppl'][m]:9.2f}  {r['chosen']}")
    if len(a.modes) == 2:
        print(f"same plan: {out['same_plan']}; max relative check-loss gap {out['max_rel_check_loss_gap']:.2e}; "
              f"max |logit diff| {out['max_abs_logit_diff']:.2e}")
    print(f"-> {a.json}")


if __name__ == "__main__":
    main()
