"""Scoring cost vs one plain forward pass (issue: scoring must cost at most 1.2x a forward).

LLM-Drop scoring runs the decoder over the calibration tokens once, with hooks that accumulate float64
cosine sums; the reference is a plain `model(input_ids)` forward (with the LM head) over the same tokens
in the same batches. Prints a table and writes JSON. Times are medians of --repeats after one warm-up.

    .venv/bin/python benchmarks/bench_scoring.py [--model smollm2-135m] [--samples 16] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from prunekit.adapters import get_adapter
from prunekit.data import calibration_data
from prunekit.drop import score_model
from prunekit.io.checkpoint import load_model


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: allocator, thread pools, lazy inits
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="c4")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="benchmarks/results/scoring.json")
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

    fwd = timed(forward, a.repeats)
    sc = timed(lambda: score(True), a.repeats)
    sc_np = timed(lambda: score(False), a.repeats)
    f, s, s2 = statistics.median(fwd), statistics.median(sc), statistics.median(sc_np)
    rows = [("plain forward (with LM head)", f, 1.0), ("scoring (block/attn/mlp + pairwise)", s, s / f),
            ("scoring (block/attn/mlp)", s2, s2 / f)]
    print(f"{a.model}: {a.samples} x {a.seq_len} calibration tokens, batch {a.batch_size}, "
          f"torch threads {torch.get_num_threads()}, median of {a.repeats}")
    print(f"{'run':40s} {'seconds':>9s} {'x forward':>10s}")
    for name, t, r in rows:
        print(f"{name:40s} {t:9.2f} {r:10.2f}")
    result = {"model": a.model, "samples": a.samples, "seq_len": a.seq_len, "batch_size": a.batch_size,
              "repeats": a.repeats, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "forward_s": fwd, "score_pairwise_s": sc, "score_s": sc_np,
              "ratio_pairwise": s / f, "ratio": s2 / f}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {a.json}")


if __name__ == "__main__":
    main()
