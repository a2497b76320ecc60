"""`compress`'s error correction with and without input maps, side by side on one search's best candidate.

One `compress` search per setting of the input maps' ridge (`compress(input_ridge=...)`; `none`: output
projections only, the default), each as the command would run it (default calibration: c4's calibration half,
64 x 512 tokens; `--rounds`, default 1 here to save time) on a fresh copy of the dense model. The search is
deterministic, so every setting corrects the same best uncorrected candidate; each row gives that candidate's
corrected check perplexity (the search's own held-out check part, what compress chooses by, from the plan's
correction record) and, for the report only, the wiki perplexity (held-out windows of the evaluation half,
never the calibration) of the model compress returns: the corrected one where the correction checked better
(`applied`). Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_correct_inputs.py [--model smollm2-135m] [--budget params=0.8]
        [--ridges none,1.0,0.1,0.01] [--json benchmarks/results/correct_inputs.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import prunekit
from prunekit.compress import DEFAULT_SAMPLES, compress, parse_budget
from prunekit.losses import loss_perplexity


def setting(ridge: float | None) -> str:
    return "outputs only" if ridge is None else f"input maps, ridge {ridge:g}"


def corrected_row(dense: Any, calib: Any, windows: Any, budget: str, rounds: int,
                  ridge: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One search on a copy of `dense` with the correction's input maps at `ridge`: its row, and the plan's
    correction record."""
    model = copy.deepcopy(dense)
    result = compress(model, prunekit.get_adapter(model), calib, parse_budget(budget), rounds=rounds,
                      progress=False, input_ridge=ridge)
    record = result.plan.options["correction"]
    best = record["tried"][0]  # the best uncorrected candidate, corrected
    wiki = prunekit.perplexity(model, windows, progress=False)["perplexity"]
    row = {"setting": setting(ridge), "candidate": best["candidate"], "check_ppl": loss_perplexity(best["check_value"]),
           "wiki_ppl": wiki, "chosen": result.chosen, "applied": record["applied"],
           "correction_seconds": record["seconds"], "seconds": result.plan.options["seconds"]}
    return row, record


def uncorrected_row(record: dict[str, Any]) -> dict[str, Any]:
    """The best candidate before its correction, from a correction record."""
    best = record["tried"][0]
    return {"setting": "uncorrected", "candidate": best["candidate"],
            "check_ppl": loss_perplexity(best["check_value_uncorrected"]), "wiki_ppl": None, "chosen": None,
            "applied": None, "correction_seconds": 0.0, "seconds": 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budget", default="params=0.8")
    p.add_argument("--ridges", default="none,1.0,0.1,0.01")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--json", default="benchmarks/results/correct_inputs.json")
    a = p.parse_args()
    ridges = [None if r == "none" else float(r) for r in a.ridges.split(",")]
    dense, tok = prunekit.load_model(a.model)
    calib = prunekit.calibration_data(tok, "c4", DEFAULT_SAMPLES, 512)
    windows = prunekit.eval_windows(tok, "wiki", a.windows, 1024)
    dense_wiki = prunekit.perplexity(dense, windows, progress=False)["perplexity"]
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    for ridge in ridges:
        row, record = corrected_row(dense, calib, windows, a.budget, a.rounds, ridge)
        if not rows:
            rows.append(uncorrected_row(record))
        rows.append(row)
        print(row, flush=True)
    out = {"model": a.model, "budget": a.budget, "rounds": a.rounds, "calibration": "c4 calib half, "
           f"{DEFAULT_SAMPLES} x 512", "eval": f"wiki eval half, {a.windows} x 1024", "dense_wiki_ppl": dense_wiki,
           "seconds": round(time.monotonic() - started, 1), "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"\n{a.model} {a.budget}, dense wiki {dense_wiki:.2f}")
    print("| setting | candidate | check ppl | wiki ppl | chosen | correction s |\n|---|---|---:|---:|---|---:|")
    for r in rows:
        wiki = "" if r["wiki_ppl"] is None else f"{r['wiki_ppl']:.2f}"
        print(f"| {r['setting']} | {r['candidate']} | {r['check_ppl']:.2f} | {wiki} | {r['chosen'] or ''} "
              f"| {r['correction_seconds']} |")


if __name__ == "__main__":
    main()
