"""Training-free linear repair (target: it improves attention drop 8 and block drop 4 on SmolLM2).

One LLM-Drop scoring pass on the calibration text (first half of c4), the one-shot plans for each row,
then held-out perplexity (second half of wiki, never seen in calibration) of the dropped model without and
with `prunekit.repair.linear_repair` (maps fitted on 3/4 of the calibration samples, each kept only if it
lowers the loss on the other 1/4). Prints a table and writes benchmarks/results/repair.json.

    .venv/bin/python benchmarks/bench_repair.py [--model smollm2-135m] [--samples 16] [--seq-len 512]
"""

from __future__ import annotations

import copy
import time

from common import add_json, add_model, add_samples, heldout_perplexity, heldout_windows, parser, write_results

import prunekit
from prunekit.drop import plan_from_scores
from prunekit.repair import linear_repair

ROWS = {"attention drop 8": ("attn", 8), "block drop 4": ("block", 4), "MLP drop 4": ("mlp", 4)}


def main() -> None:
    p = parser(__doc__)
    add_model(p)
    p.add_argument("--calib", default="c4")
    p.add_argument("--text", default="wiki")
    add_samples(p)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--window-len", type=int, default=1024)
    p.add_argument("--ridge", type=float, default=1e-2)
    add_json(p, "benchmarks/results/repair.json")
    a = p.parse_args()

    dense, tok = prunekit.load_model(a.model)
    ad = prunekit.get_adapter(dense)
    calib = prunekit.calibration_data(tok, a.calib, a.samples, a.seq_len)
    windows = heldout_windows(tok, a.windows, a.window_len, a.text)
    scores = prunekit.score_model(dense, ad, calib, progress=False)
    dense_ppl = heldout_perplexity(dense, windows)
    rows = [{"model": "dense", "perplexity": dense_ppl}]
    for name, (target, n) in ROWS.items():
        pruned = copy.deepcopy(dense)
        plan = plan_from_scores(scores, prunekit.get_adapter(pruned), calib, target=target, n=n, source=a.model)
        prunekit.apply_plan(prunekit.get_adapter(pruned), plan)
        before = heldout_perplexity(pruned, windows)
        t0 = time.time()
        rec = linear_repair(dense, pruned, plan, calib, ridge=a.ridge, progress=False)
        seconds = time.time() - t0
        after = heldout_perplexity(pruned, windows)
        rows.append({"model": name, "dropped": [f"{d.module}@{d.layer}" for d in plan.dropped],
                     "perplexity": before, "perplexity_repaired": after,
                     "spans": len(rec["spans"]), "spans_applied": sum(s["applied"] for s in rec["spans"]),
                     "relative_residuals": [s["relative_residual"] for s in rec["spans"]],
                     "check_loss": [rec["check_loss_unrepaired"], rec["check_loss"]], "repair_seconds": seconds})
        del pruned
    out = {"model": a.model, "calibration": calib.describe(), "eval": {"text": a.text, "windows": a.windows,
           "window_len": a.window_len}, "ridge": a.ridge, "rows": rows}
    write_results(out, a.json)
    print(f"{a.model}: calibration {a.samples}x{a.seq_len} {a.calib}; perplexity on {a.windows}x{a.window_len} "
          f"held-out {a.text}; ridge {a.ridge}")
    print(f"{'model':20s} {'unrepaired':>11s} {'repaired':>9s} {'maps kept':>10s}")
    for r in rows:
        rep = r.get("perplexity_repaired")
        rep_s = "-" if rep is None else f"{rep:.2f}"
        kept = f"{r['spans_applied']}/{r['spans']}" if "spans" in r else "-"
        print(f"{r['model']:20s} {r['perplexity']:11.2f} {rep_s:>9s} {kept:>10s}")
    print(f"-> {a.json}")


if __name__ == "__main__":
    main()
