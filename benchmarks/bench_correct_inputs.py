"""`compress`'s error correction with and without input maps, side by side on one search's best candidate.

One `compress` search runs as the command would (default calibration: c4's calibration half, 64 x 512 tokens;
`--rounds`, default 1 here to save time), then its best uncorrected candidate is corrected once per setting of
the input maps' ridge (`none`: output projections only, the correction before input maps), each scored on
the search's own held-out check part (what compress chooses by) and, for the report only, on held-out wiki
windows (the evaluation half, never the calibration). Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_correct_inputs.py [--model smollm2-135m] [--budget params=0.8]
        [--ridges none,1.0,0.1,0.01] [--json benchmarks/results/correct_inputs.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import prunekit
from prunekit.compress import DEFAULT_SAMPLES, compress, search
from prunekit.compress.budget import parse_budget
from prunekit.compress.correct import correct_model
from prunekit.losses import loss_perplexity


class _Done(Exception):
    """Stops the search once every setting is measured (nothing is applied or saved)."""


def corrections(model: Any, windows: Any, ridges: list[float | None], rows: list[dict[str, Any]]) -> Any:
    """A replacement for `_Search.corrected`: the best candidate corrected once per ridge, each measured."""

    def corrected(self: Any) -> Any:
        base = self._ranked()[0]
        rows.append({"setting": "uncorrected", "candidate": base.name, "check_ppl": loss_perplexity(base.value),
                     "wiki_ppl": None, "seconds": 0.0})
        for ridge in ridges:
            search.correct_model = functools.partial(correct_model, input_ridge=ridge)
            started = time.monotonic()
            fixed, _ = self._correct(base)
            seconds = time.monotonic() - started
            wiki = prunekit.perplexity(model, windows, progress=False)["perplexity"]
            rows.append({"setting": "outputs only" if ridge is None else f"input maps, ridge {ridge:g}",
                         "candidate": base.name, "check_ppl": loss_perplexity(fixed.value), "wiki_ppl": wiki,
                         "seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
            self.m.reset()
        raise _Done

    return corrected


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
    model, tok = prunekit.load_model(a.model)
    calib = prunekit.calibration_data(tok, "c4", DEFAULT_SAMPLES, 512)
    windows = prunekit.eval_windows(tok, "wiki", a.windows, 1024)
    dense_wiki = prunekit.perplexity(model, windows, progress=False)["perplexity"]
    rows: list[dict[str, Any]] = []
    search._Search.corrected = corrections(model, windows, ridges, rows)
    started = time.monotonic()
    try:
        compress(model, prunekit.get_adapter(model), calib, parse_budget(a.budget), rounds=a.rounds, progress=False)
    except _Done:
        pass
    out = {"model": a.model, "budget": a.budget, "rounds": a.rounds, "calibration": "c4 calib half, "
           f"{DEFAULT_SAMPLES} x 512", "eval": f"wiki eval half, {a.windows} x 1024", "dense_wiki_ppl": dense_wiki,
           "seconds": round(time.monotonic() - started, 1), "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"\n{a.model} {a.budget}, dense wiki {dense_wiki:.2f}")
    print("| setting | candidate | check ppl | wiki ppl | seconds |\n|---|---|---:|---:|---:|")
    for r in rows:
        wiki = "" if r["wiki_ppl"] is None else f"{r['wiki_ppl']:.2f}"
        print(f"| {r['setting']} | {r['candidate']} | {r['check_ppl']:.2f} | {wiki} | {r['seconds']} |")


if __name__ == "__main__":
    main()
