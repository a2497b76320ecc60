"""Choosing `prunekit heal`'s default recipe (learning rate, causal-LM share of the loss) WITHOUT looking at any
evaluation half: short proxy runs judged on calibration-half windows that the proxy never read.

The model is `bench_heal.py`'s, pruned by its code with its options (--prune: by default LLM-Drop attention drop
--drop of SmolLM2, 16 x 512 c4 calibration; `--prune mlp` for the MLP-keep-50% model). Each row
heals a copy on the first --steps x --batch-size windows of `prunekit heal`'s default text (`mix`: the
calibration halves of every built-in text, spread evenly over each half) and is scored on SELECTION windows:
for wiki and c4, windows of the calibration half placed half-way between the training windows, so they
share no token with what was read and come from no evaluation half. The rows are `LOSS:LR`, LOSS one of `ce`
(causal LM), `kd` (distillation from the dense model) or `kdA` (A x causal LM + (1 - A) x distillation),
optionally followed by `tT` (distillation temperature T, default 1) and `hW` (plus W x the hidden-state loss,
every layer's residual stream against the dense model's): `kd0.5t2h1:5e-4`.
Prints a table and writes JSON.

    nice -n 5 .venv/bin/python benchmarks/bench_heal_recipe.py [--steps 16] [--rows ce:5e-5,kd:5e-5,...]
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from bench_heal import add_prune_args, ppl, prune
from torch import nn

from prunekit.data import parse_text_spec, token_stream
from prunekit.io.checkpoint import load_model
from prunekit.io.outputs import write_json
from prunekit.recovery import recover
from prunekit.recovery.sources import training_data

SELECT_TEXTS = ("wiki", "c4")


def parse_row(row: str) -> tuple[str, float, float | None, float, float]:
    """`ce:5e-5` -> (name, lr, alpha, hidden weight, temperature): alpha None for causal LM only, 0 for pure
    distillation; `kd0.5t2h5:2e-4` is alpha 0.5, temperature 2, hidden weight 5."""
    loss, _, lr = row.partition(":")
    if loss == "ce":
        return row, float(lr), None, 0.0, 1.0
    m = re.fullmatch(r"kd([0-9.]*)(?:t([0-9.]+))?(?:h([0-9.]+))?", loss)
    if m is None:
        raise SystemExit(f"bad row {row!r}: LOSS:LR with LOSS ce, kd, kdA, kdAtT or kdAtThW")
    a, t, h = m.groups()
    return row, float(lr), float(a or 0), float(h or 0), float(t or 1)


def selection_windows(tokenizer: Any, text: str, read: int, seq_len: int, n: int) -> torch.Tensor:
    """`n` windows of `text`'s calibration half from the gaps between the `read` windows that `training_data`
    spread evenly over it (window i starts at i * (len // read)), so none overlaps a training window; evenly
    spaced over every window that fits in a gap."""
    stream = token_stream(tokenizer, text, "calib")
    stride = len(stream) // read
    starts = [i * stride + seq_len * (k + 1) for i in range(read) for k in range(stride // seq_len - 1)]
    if len(starts) < n:
        raise SystemExit(f"{text}: the gaps between the training windows hold {len(starts)} windows, not {n}")
    return torch.stack([stream[s: s + seq_len] for s in (starts[round(j * len(starts) / n)] for j in range(n))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    add_prune_args(p)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--select", type=int, default=16, help="selection windows per text (default 16)")
    p.add_argument("--rows", default="ce:5e-5,kd:5e-5,ce:2e-4,kd:2e-4,kd0.5:2e-4")
    p.add_argument("--json", default="benchmarks/results/heal_recipe.json")
    args = p.parse_args()
    rows_spec = [parse_row(r) for r in args.rows.split(",")]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    dense, tok = load_model(args.model)
    dense.requires_grad_(False)
    spec = parse_text_spec("mix")
    train, sources = training_data(tok, spec, args.steps * args.batch_size, args.seq_len)
    read = {s["source"]: s["samples"] for s in sources}
    select = {t: selection_windows(tok, t, read[t], args.seq_len, args.select) for t in SELECT_TEXTS}
    pruned, plan, what = prune(dense, tok, args)

    def score(model: nn.Module) -> dict[str, float]:
        out = {t: ppl(model, w) for t, w in select.items()}
        out["mean_log"] = sum(math.log(v) for v in out.values()) / len(select)
        return out

    rows: list[dict[str, Any]] = [{"row": "dense", **score(dense)}, {"row": "pruned", **score(pruned)}]
    for name, lr, alpha, hidden, temperature in rows_spec:
        student = copy.deepcopy(pruned)
        t = time.perf_counter()
        kw: dict[str, Any] = {} if alpha is None else {"teacher": dense, "alpha": alpha, "hidden_weight": hidden,
                                                        "temperature": temperature}
        rec = recover(student, train, steps=args.steps, batch_size=args.batch_size, lr=lr, progress=False, **kw)
        rows.append({"row": name, "lr": lr, "alpha": 1.0 if alpha is None else alpha, "hidden_weight": hidden,
                     "temperature": temperature, **score(student),
                     "tokens_seen": rec["tokens_seen"], "minutes": round((time.perf_counter() - t) / 60, 2)})
        print(f"{name}: " + " ".join(f"{t} {rows[-1][t]:.2f}" for t in SELECT_TEXTS), flush=True)
        del student
        write_json({"model": args.model, "pruning": what, "method": plan.method, "settings": vars(args), "read": read,
                    "selection": f"{args.select} x {args.seq_len} calibration-half windows of "
                                 f"{', '.join(SELECT_TEXTS)} between the training windows",
                    "rows": rows}, args.json, force=True)
    print(f"\n{'row':<14} " + " ".join(f"{t:>8}" for t in SELECT_TEXTS) + f" {'mean log':>9} {'min':>6}")
    for r in rows:
        print(f"{r['row']:<14} " + " ".join(f"{r[t]:>8.2f}" for t in SELECT_TEXTS)
              + f" {r['mean_log']:>9.4f} {r.get('minutes', ''):>6}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
