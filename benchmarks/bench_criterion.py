"""What to drop, chosen three ways on the built-in SmolLM2-135M: LLM-Drop's cosine similarity, the measured
calibration loss, and the KL divergence from the dense model (`prunekit drop --criterion cosine|loss|kl`).

Each row loads the model afresh, chooses `--n` modules of `--target` with the library's `llm_drop` on
`--samples` x 512 tokens of c4's calibration half (loss/kl: greedy, among the `--prefilter` most redundant by
cosine per step), and measures perplexity on held-out wiki windows (the evaluation half, never seen by the
choice). It records what was dropped, the search's cost in forward-pass equivalents over the calibration
tokens (`plan.options["forward_passes"]`) and the wall time. Prints a table and writes JSON.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_criterion.py [--target attn --n 8 --prefilter 8]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from common import (
    add_json,
    add_model,
    add_samples,
    heldout_perplexity,
    heldout_windows,
    machine_info,
    parser,
    write_results,
)

from prunekit.adapters import get_adapter
from prunekit.data import calibration_data
from prunekit.drop import llm_drop
from prunekit.io.checkpoint import load_model

CRITERIA = ("cosine", "loss", "kl")


def row(criterion: str, a: argparse.Namespace, windows: torch.Tensor) -> dict[str, Any]:
    model, tok = load_model(a.model)
    calib = calibration_data(tok, "c4", a.samples, 512)
    t0 = time.perf_counter()
    plan = llm_drop(model, get_adapter(model), calib, target=a.target, n=a.n, criterion=criterion,
                    prefilter=a.prefilter, progress=False)
    seconds = time.perf_counter() - t0
    return {"criterion": criterion, "dropped": [f"{d.module}@{d.layer}" for d in plan.dropped],
            "wiki_perplexity": heldout_perplexity(model, windows),
            "forward_passes": plan.options.get("forward_passes"), "choose_seconds": round(seconds, 1)}


def main() -> None:
    p = parser(__doc__)
    add_model(p)
    p.add_argument("--target", default="attn", choices=("attn", "mlp", "block", "joint"))
    p.add_argument("--n", type=int, default=8, help="modules to drop (default 8)")
    p.add_argument("--prefilter", type=int, default=8, help="loss/kl candidates per step (default 8)")
    add_samples(p, help="calibration sequences of 512 (default 16)")
    p.add_argument("--windows", type=int, default=10, help="held-out wiki windows of 1024 (default 10)")
    p.add_argument("--criteria", default=",".join(CRITERIA), help="rows, in order (default cosine,loss,kl)")
    add_json(p, "benchmarks/results/criterion.json")
    a = p.parse_args()
    wanted = a.criteria.split(",")
    if set(wanted) - set(CRITERIA):
        p.error(f"criteria are {', '.join(CRITERIA)}")
    dense, tok = load_model(a.model)
    windows = heldout_windows(tok, a.windows, 1024)
    rows: list[dict[str, Any]] = [{"criterion": "dense", "dropped": [], "forward_passes": 0, "choose_seconds": 0,
                                   "wiki_perplexity": heldout_perplexity(dense, windows)}]
    del dense
    out = {"settings": {k: v for k, v in vars(a).items() if k != "json"}, "rows": rows,
           "machine": machine_info(("platform", "torch", "threads"))}
    for c in wanted:
        rows.append(row(c, a, windows))
        print(f"{c}: {rows[-1]}", flush=True)
        write_results(out, a.json)  # after every row: a run cut short keeps what it measured
    print("\n| criterion | dropped | wiki ppl | forward passes | seconds |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['criterion']} | {' '.join(r['dropped'])} | {r['wiki_perplexity']:.2f} | "
              f"{r['forward_passes']} | {r['choose_seconds']} |")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
