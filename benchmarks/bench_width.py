"""TransAct width pruning on the built-in SmolLM2-135M: perplexity vs removed parameters.

Calibrates on c4 (its calibration half), evaluates perplexity on held-out wiki windows (its evaluation
half), for: the dense model; MLP keep 75% and 50%; attention keep 2 of 3 KV groups; each one-shot vs
iterative (--shots), uniform vs per-layer; and Attention Drop (LLM-Drop) at about the removed-parameter
count of the heads row (and of the MLP-75% row). One dense model is loaded and deep-copied for every row.
Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_width.py [--samples 16] [--seq-len 256] [--windows 8] [--window-len 512]
"""

from __future__ import annotations

import copy
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
from torch import nn

from prunekit.adapters import get_adapter
from prunekit.data import calibration_data
from prunekit.drop import plan_drops
from prunekit.drop.scorer import SimilarityScorer
from prunekit.io.checkpoint import load_model
from prunekit.plans import PruningPlan
from prunekit.surgery import apply_plan, count_parameters
from prunekit.width import width_prune


def width_summary(model: nn.Module) -> dict[str, Any]:
    ad = get_adapter(model)
    heads = [ad.attention_shape(layer)[0] for layer in ad.layers()]
    kv = [ad.attention_shape(layer)[1] for layer in ad.layers()]
    ch = [ad.mlp_width(layer) for layer in ad.layers()]
    return {"heads": [min(heads), max(heads)], "kv_heads": [min(kv), max(kv)], "channels": [min(ch), max(ch)]}


def main() -> None:
    p = parser(__doc__)
    add_model(p, help="model to prune (default the built-in SmolLM2-135M)")
    p.add_argument("--calib", default="c4", help="calibration text (default c4)")
    p.add_argument("--eval", default="wiki", help="evaluation text (default wiki, its held-out half)")
    add_samples(p, help="calibration sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--windows", type=int, default=8, help="perplexity windows (default 8)")
    p.add_argument("--window-len", type=int, default=512, help="tokens per perplexity window (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration batch size (default 4)")
    p.add_argument("--shots", type=int, default=8, help="shots of the iterative rows (default 8)")
    p.add_argument("--scorer", default="activation", help="width importance scorer (default activation)")
    add_json(p, "benchmarks/results/width.json", help="where to write the results")
    a = p.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    dense, tok = load_model(a.model)
    calib = calibration_data(tok, a.calib, a.samples, a.seq_len)
    windows = heldout_windows(tok, a.windows, a.window_len, a.eval)
    dense_params = count_parameters(dense)
    rows: list[dict[str, Any]] = []

    def add(name: str, model: nn.Module, seconds: float, **extra: Any) -> None:
        ppl = heldout_perplexity(model, windows)
        removed = dense_params - count_parameters(model)
        rows.append({"name": name, "params": count_parameters(model), "removed": removed,
                     "removed_pct": 100.0 * removed / dense_params, "perplexity": ppl, "prune_s": seconds,
                     "widths": width_summary(model) if "drop" not in name else None, **extra})
        r = rows[-1]
        print(f"  {name:<34} removed {removed / 1e6:6.2f}M ({r['removed_pct']:5.2f}%)  ppl {ppl:9.3f}  "
              f"[{seconds:.0f}s]", flush=True)

    add("dense", dense, 0.0)
    targets = [("MLP 75%", dict(mlp_keep=0.75)), ("MLP 50%", dict(mlp_keep=0.5)),
               ("heads 2/3 KV groups", dict(heads_keep=2, head_mode="kv-groups"))]
    removed_by_target: dict[str, int] = {}
    for label, kw in targets:
        for mode in ("uniform", "per-layer"):
            for shots in (1, a.shots):
                model = copy.deepcopy(dense)
                t = time.perf_counter()
                # multiple_of=1: exact targets, as in the recorded results (per-layer widths are not rounded).
                plan = width_prune(model, get_adapter(model), calib, mode=mode, shots=shots, scorer=a.scorer,
                                   multiple_of=1, batch_size=a.batch_size, progress=False, **kw)  # type: ignore[arg-type]
                name = f"{label}, {mode}, {shots} shot{'s' if shots > 1 else ''}"
                add(name, model, time.perf_counter() - t, method="transact", target=label, mode=mode, shots=shots,
                    options=plan.options)
                removed_by_target[label] = rows[-1]["removed"]
                del model

    # Attention Drop (LLM-Drop) at about the same removed parameters as the heads row and the MLP-75% row.
    ad = get_adapter(dense)
    t = time.perf_counter()
    scores = SimilarityScorer(dense, calib, adapter=ad, batch_size=a.batch_size, pairwise=False, progress=False).score()
    score_s = time.perf_counter() - t
    probe = copy.deepcopy(dense)
    apply_plan(get_adapter(probe), PruningPlan(dropped=plan_drops(scores, "attn", 1)))
    per_layer = dense_params - count_parameters(probe)
    del probe
    for label in ("heads 2/3 KV groups", "MLP 75%"):
        n = max(1, min(ad.num_layers - 1, round(removed_by_target[label] / per_layer)))
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        drops = plan_drops(scores, "attn", n)
        apply_plan(get_adapter(model), PruningPlan(dropped=drops, method="attn"))
        add(f"attn drop {n} (~{label})", model, score_s + time.perf_counter() - t, method="attn-drop",
            target=label, dropped=[d.layer for d in drops])
        del model

    header = f"{'configuration':<36} {'removed':>9} {'removed%':>9} {'ppl':>9} {'vs dense':>9} {'time':>6}"
    lines = [header, "-" * len(header)]
    base = rows[0]["perplexity"]
    for r in rows:
        lines.append(f"{r['name']:<36} {r['removed'] / 1e6:8.2f}M {r['removed_pct']:8.2f}% {r['perplexity']:9.3f} "
                     f"{r['perplexity'] / base:8.2f}x {r['prune_s']:5.0f}s")
    table = "\n".join(lines)
    print()
    print(table)
    machine = machine_info()
    result = {
        "model": a.model, "dense_params": dense_params, "calibration": calib.describe(),
        "eval": {"source": a.eval, "windows": a.windows, "window_len": a.window_len},
        "scorer": a.scorer, "shots": a.shots, "platform": machine["platform"],
        "torch_threads": machine["threads"], "total_s": time.perf_counter() - t0, "rows": rows,
        "table": table,
    }
    out = write_results(result, a.json)
    print(f"\nwrote {out} ({result['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
