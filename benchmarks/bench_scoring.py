"""Scoring cost vs one plain forward pass (target: scoring costs at most 1.2x a forward).

LLM-Drop scoring runs the decoder over the calibration tokens once, with hooks that accumulate float64
cosine sums; the reference is a plain `model(input_ids)` forward (with the LM head) over the same tokens
in the same batches. Prints a table and writes JSON. Times are medians of --repeats after one warm-up.

    .venv/bin/python benchmarks/bench_scoring.py [--model smollm2-135m] [--samples 16] [--seq-len 512]
"""

from __future__ import annotations

import statistics
import time

import torch
from common import add_json, add_model, add_samples, machine_info, parser, write_results

from prunekit.adapters import get_adapter
from prunekit.data import calibration_data
from prunekit.drop import score_model
from prunekit.evaluation.bench import peak_rss_bytes
from prunekit.io.checkpoint import load_model


def interleaved(fns: dict[str, object], rounds: int) -> dict[str, list[float]]:
    """Seconds of each function per round, the functions run one after another inside every round, so a
    change in machine load hits them alike and the per-round ratios stay meaningful."""
    for fn in fns.values():
        fn()  # warm-up: allocator, thread pools, lazy inits
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t)
    return out


def main() -> None:
    p = parser(__doc__)
    add_model(p)
    p.add_argument("--calib", default="c4")
    add_samples(p)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    add_json(p, "benchmarks/results/scoring.json")
    a = p.parse_args()

    model, tok = load_model(a.model)
    adapter = get_adapter(model)
    calib = calibration_data(tok, a.calib, a.samples, a.seq_len)

    @torch.no_grad()
    def forward() -> None:
        for ids, mask in calib.batches(a.batch_size):
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    def score(pairwise: bool) -> None:
        score_model(model, adapter, calib, batch_size=a.batch_size, pairwise=pairwise, progress=False)

    t = interleaved({"forward": forward, "pairwise": lambda: score(True), "plain": lambda: score(False)}, a.repeats)
    fwd, sc, sc_np = t["forward"], t["pairwise"], t["plain"]
    f, s, s2 = statistics.median(fwd), statistics.median(sc), statistics.median(sc_np)
    r_pair = statistics.median(x / y for x, y in zip(sc, fwd))
    r_plain = statistics.median(x / y for x, y in zip(sc_np, fwd))
    rows = [("plain forward (with LM head)", f, 1.0), ("scoring (block/attn/mlp + pairwise)", s, r_pair),
            ("scoring (block/attn/mlp)", s2, r_plain)]
    print(f"{a.model}: {a.samples} x {a.seq_len} calibration tokens, batch {a.batch_size}, "
          f"torch threads {torch.get_num_threads()}, {a.repeats} interleaved rounds, median per-round ratio")
    print(f"{'run':40s} {'seconds':>9s} {'x forward':>10s}")
    for name, t, r in rows:
        print(f"{name:40s} {t:9.2f} {r:10.2f}")
    result = {"model": a.model, "samples": a.samples, "seq_len": a.seq_len, "batch_size": a.batch_size,
              "repeats": a.repeats, **machine_info(("threads", "machine")),
              "forward_s": fwd, "score_pairwise_s": sc, "score_s": sc_np,
              "ratio_pairwise": r_pair, "ratio": r_plain, "peak_rss_bytes": peak_rss_bytes()}
    write_results(result, a.json)
    print(f"-> {a.json}")


if __name__ == "__main__":
    main()
