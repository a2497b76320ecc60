"""The LLM-Drop paper's table on a built-in model: dense vs layer dropping vs TransAct width pruning.

For each row: perplexity on held-out wiki windows, LAMBADA (lambada_openai: last-word perplexity and accuracy),
the seven zero-shot tasks of the papers (arc_challenge, arc_easy, boolq, hellaswag, openbookqa, piqa,
winogrande) through lm-eval on the in-memory model, their average (acc_norm for arc/hellaswag/openbookqa/piqa,
acc for boolq/winogrande: prunekit.evaluation.zeroshot.AVERAGE_METRIC) with its standard error, parameters and KV-cache
bytes per token. Calibration is on c4 (its calibration half); nothing is tuned on the evaluation data.

Rows (``--rows``, default all): dense; attention drop 4/8/12; MLP drop 4; block drop 4 one-shot and
iterative; joint drop 8; TransAct MLP 75%; TransAct query heads 2/3 (per KV group); compress params=0.9.
Each row reloads the model from the converted checkpoint and applies the library's own plan
(``drop.llm_drop`` / ``width.width_prune`` / ``compress``, then ``surgery.apply_plan``).

Results are written to ``--json`` (default ``benchmarks/results/paper.json``) atomically after every task of
every row (a row's finished tasks wait under ``partial`` until the row is complete; the seven tasks run
``--chunk`` documents at a time, each slice kept as it finishes). A rerun with the same settings keeps the rows,
tasks and slices already measured and only runs the missing ones (a row's are kept only if its pruned model has
the same structure), so an interrupted run loses at most one slice; other settings start a fresh file. Full task
sets take hours per row here, so this is what lets them span several sessions. Prints a Markdown table at the end.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_paper.py --limit 300 [--rows dense,attn-drop-8,block-drop-4]
    PYTHONPATH=src .venv/bin/python benchmarks/bench_paper.py --model qwen2.5-coder-1.5b --limit 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.adapters import get_adapter
from prunekit.compress import Budget, compress
from prunekit.data import CalibrationData, calibration_data, eval_windows
from prunekit.drop import llm_drop
from prunekit.evaluation.bench import PeakRSS
from prunekit.evaluation.perplexity import kv_bytes_per_token, perplexity
from prunekit.evaluation.task_data import PAPER_DATA
from prunekit.evaluation.zeroshot import AVERAGE_METRIC, PAPER_TASKS, evaluate_tasks, paper_average
from prunekit.io.checkpoint import load_model, load_tokenizer, resolve_model_path
from prunekit.plans import PruningPlan
from prunekit.surgery import apply_plan, count_parameters
from prunekit.width import width_prune

# Run order: cheapest first (the dense SmolLM2 full-set row's seconds: openbookqa 43, arc_challenge 87,
# winogrande 89, arc_easy 136, piqa 202, lambada ~530, boolq 937, hellaswag 4455 of 6479), so a run stopped
# mid-row has kept as many tasks as its time allowed.
TASKS = ["openbookqa", "arc_challenge", "winogrande", "arc_easy", "piqa", "lambada", "boolq", "hellaswag"]
Prune = Callable[[nn.Module, CalibrationData, argparse.Namespace], PruningPlan | None]
# evaluate(task, docs): lm-eval's answer for one task on `docs` (None: the first --limit documents, or all).
Evaluate = Callable[[str, range | None], dict[str, Any]]
MC_METRICS = ("acc", "acc_norm")  # the per-document scores a sliced multiple-choice task keeps


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    prune: Prune


def _drop(target: str, n: int, iterative: bool = False) -> Prune:
    def prune(model: nn.Module, calib: CalibrationData, a: argparse.Namespace) -> PruningPlan:
        adapter = get_adapter(model)
        plan = llm_drop(model, adapter, calib, target=target, n=n, iterative=iterative,  # type: ignore[arg-type]
                        batch_size=a.batch_size, progress=False)
        apply_plan(adapter, plan)
        return plan
    return prune


def _transact_mlp(keep: float) -> Prune:
    def prune(model: nn.Module, calib: CalibrationData, a: argparse.Namespace) -> PruningPlan:
        # width_prune narrows the model in place and returns the plan; nothing else to apply.
        # multiple_of=1: exact targets, as in the recorded results (75% of 1536 is a multiple of 64 anyway).
        return width_prune(model, get_adapter(model), calib, mlp_keep=keep, mode="uniform", shots=a.shots,
                           multiple_of=1, batch_size=a.batch_size, progress=False)
    return prune


def _transact_query_heads(keep: float) -> Prune:
    """Query heads, the same number from every KV group, so the KV cache stays: the head row every GQA shape
    allows (2 of 3 KV groups needs a multiple of 3 groups, which Qwen2.5's 2 do not have)."""
    def prune(model: nn.Module, calib: CalibrationData, a: argparse.Namespace) -> PruningPlan:
        return width_prune(model, get_adapter(model), calib, heads_keep=keep, head_mode="query-heads",
                           mode="uniform", shots=a.shots, batch_size=a.batch_size, progress=False)
    return prune


def _compress(keep: float) -> Prune:
    """`prunekit compress --budget params=KEEP` with its defaults, on this row's calibration data."""
    def prune(model: nn.Module, calib: CalibrationData, a: argparse.Namespace) -> PruningPlan:
        return compress(model, get_adapter(model), calib, Budget("params", keep), batch_size=a.batch_size,
                        progress=False).plan
    return prune


ROWS: list[Row] = [
    Row("dense", "dense", lambda model, calib, a: None),
    Row("attn-drop-4", "attention drop 4", _drop("attn", 4)),
    Row("attn-drop-8", "attention drop 8", _drop("attn", 8)),
    Row("attn-drop-12", "attention drop 12", _drop("attn", 12)),
    Row("mlp-drop-4", "MLP drop 4", _drop("mlp", 4)),
    Row("block-drop-4", "block drop 4 (one-shot)", _drop("block", 4)),
    Row("block-drop-4-iter", "block drop 4 (iterative)", _drop("block", 4, iterative=True)),
    Row("joint-drop-8", "joint drop 8", _drop("joint", 8)),
    Row("transact-mlp-75", "TransAct MLP 75%", _transact_mlp(0.75)),
    Row("transact-heads-67", "TransAct query heads 2/3", _transact_query_heads(2 / 3)),
    Row("compress-90", "compress params=0.9", _compress(0.9)),
]


def write_json(path: Path, data: Any) -> None:
    """Write to a temporary file beside ``path`` and rename it, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def measure(row: Row, a: argparse.Namespace, windows: torch.Tensor, partial: dict[str, Any],
            save: Callable[[], None]) -> dict[str, Any]:
    """One row; `partial` holds its tasks already measured (updated in place, `save` called after each)."""
    with PeakRSS() as mem:
        r = _measure(row, a, windows, partial, save)
    return {**r, "peak_rss_gib": round(mem.peak / 2**30, 2)}


def _measure(row: Row, a: argparse.Namespace, windows: torch.Tensor, partial: dict[str, Any],
             save: Callable[[], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, tok = load_model(a.model)  # a fresh copy per row: pruning is in place
    calib = calibration_data(tok, a.calib, a.samples, a.seq_len)
    plan = row.prune(model, calib, a)
    prune_s = time.perf_counter() - t0
    adapter = get_adapter(model)
    ppl = perplexity(model, windows, progress=False)
    structure = {
        "dropped": plan.to_json()["dropped"] if plan is not None else [],
        "widths": {str(i): {k: len(v) for k, v in w.to_json().items()} for i, w in plan.widths.items()}
        if plan is not None else {},  # units kept per layer (width rows and compress)
    }

    def evaluate(task: str, docs: range | None) -> dict[str, Any]:
        return evaluate_tasks(model, tok, [task], limit=a.limit if docs is None else None, docs=docs,
                              batch_size=a.eval_batch_size, seed=a.seed, bootstrap_iters=a.bootstrap_iters,
                              samples=True)
    sizes = {t: min(PAPER_DATA[t].rows, a.limit or PAPER_DATA[t].rows) for t in PAPER_TASKS}
    zs = row_tasks(evaluate, structure, partial, save, sizes, a.chunk)
    return {
        "name": row.name,
        "label": row.label,
        "params": count_parameters(model),
        "kv_bytes_per_token": kv_bytes_per_token(adapter),
        "wiki_perplexity": ppl["perplexity"],
        "lambada": zs["tasks"]["lambada"],
        "tasks": {t: zs["tasks"][t] for t in PAPER_TASKS},
        "average": zs["average"],
        **structure,
        "prune_s": prune_s,
        "tasks_s": zs["seconds"],
        "data_hashes": zs["data_hashes"],
        # Each question's score under the task's average metric, by doc id: rows evaluated on the same
        # questions are then compared PAIRED (`paired`), a much smaller standard error than two independent
        # averages' when only a subset of each task is run.
        "per_doc": zs["per_doc"],
    }


def row_tasks(evaluate: Evaluate, structure: dict[str, Any], partial: dict[str, Any], save: Callable[[], None],
              sizes: dict[str, int], chunk: int) -> dict[str, Any]:
    """Every task of TASKS for one pruned model, keeping each result in `partial` (and calling `save`) as soon as it
    is measured, and skipping those `partial` already holds for a model of the same `structure`; then the row's
    tasks, average, data hashes, per-question scores and summed seconds. The paper tasks run `chunk` documents at
    a time (of `sizes[task]`), each slice kept as it finishes, so even HellaSwag's hours survive a stop.
    The loglikelihood tasks are deterministic, so a task measured in an earlier run is the same measurement."""
    if partial.get("structure") != structure:  # another plan: what was kept belongs to another model
        partial.clear()
        partial.update({"structure": structure, "tasks": {}})
    for task in TASKS:
        if task in partial["tasks"]:
            continue
        if task in PAPER_TASKS:
            partial["tasks"][task] = task_in_chunks(evaluate, task, sizes[task], chunk, partial, save)
        else:
            t0 = time.perf_counter()
            zs = evaluate(task, None)
            partial["tasks"][task] = {"result": zs["tasks"][task], "data_hash": zs["data_hashes"].get(task),
                                      "seconds": time.perf_counter() - t0}
        save()
    done = partial["tasks"]
    results = {t: done[t]["result"] for t in TASKS}
    return {"tasks": results, "average": paper_average({t: results[t] for t in PAPER_TASKS}),
            "data_hashes": {t: done[t]["data_hash"] for t in TASKS},
            "per_doc": {t: done[t]["per_doc"] for t in PAPER_TASKS},
            "seconds": sum(done[t]["seconds"] for t in TASKS)}


def task_in_chunks(evaluate: Evaluate, task: str, n: int, chunk: int, partial: dict[str, Any],
                   save: Callable[[], None]) -> dict[str, Any]:
    """The first `n` documents of a multiple-choice `task`, `chunk` at a time, each slice's per-document
    metrics kept in `partial["chunks"][task]` (slices kept by an earlier run are not run again), then pooled."""
    kept = partial.setdefault("chunks", {}).setdefault(task, {})
    slices = {f"{r.start}-{r.stop}": r for r in (range(s, min(s + chunk, n)) for s in range(0, n, chunk))}
    for key, docs in slices.items():
        if key in kept:
            continue
        t0 = time.perf_counter()
        zs = evaluate(task, docs)
        kept[key] = {
            "docs": {str(d["doc_id"]): {m: d[m] for m in MC_METRICS if m in d} for d in zs["samples"][task]},
            "data_hash": zs["data_hashes"].get(task), "seconds": time.perf_counter() - t0}
        save()
    entry = pool_chunks(task, [kept[key] for key in slices])
    del partial["chunks"][task]
    if not partial["chunks"]:
        del partial["chunks"]
    return entry


def pool_chunks(task: str, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """One task's result from its slices, with lm-eval's own aggregation over the per-document scores in document
    order (`mean`, and `mean_stderr` = sample standard deviation / sqrt(n)), so pooled slices give the whole
    run's numbers."""
    from lm_eval.api.metrics import mean, mean_stderr

    hashes = {c["data_hash"] for c in chunks}
    if len(hashes) != 1:
        raise SystemExit(f"{task}: its slices were measured on different data files ({sorted(map(str, hashes))})")
    per_doc = {d: v for c in chunks for d, v in c["docs"].items()}
    order = sorted(per_doc, key=int)
    if [int(d) for d in order] != list(range(len(order))):
        raise SystemExit(f"{task}: its slices do not cover documents 0..{len(order) - 1} exactly")
    result: dict[str, Any] = {}
    for m in MC_METRICS:
        if all(m in v for v in per_doc.values()):
            x = [per_doc[d][m] for d in order]
            result.update({m: mean(x), f"{m}_stderr": mean_stderr(x)})
    result.update({"n": len(order), "average_metric": AVERAGE_METRIC[task]})
    return {"result": result, "data_hash": hashes.pop(), "seconds": sum(c["seconds"] for c in chunks),
            "per_doc": {d: per_doc[d][AVERAGE_METRIC[task]] for d in order}}


def paired(row: dict[str, Any], dense: dict[str, Any]) -> dict[str, float] | None:
    """The row's average minus dense's over the questions both answered, with the paired standard error
    (mean of the seven tasks' mean differences; se = sqrt(sum_t var_t / n_t) / 7), and the ratio of averages."""
    if "per_doc" not in row or "per_doc" not in dense:
        return None
    means, var = [], 0.0
    for t in PAPER_TASKS:
        common = sorted(set(row["per_doc"][t]) & set(dense["per_doc"][t]))
        if len(common) < 2:
            return None
        d = torch.tensor([row["per_doc"][t][k] - dense["per_doc"][t][k] for k in common], dtype=torch.float64)
        means.append(float(d.mean()))
        var += float(d.var(unbiased=True)) / len(common)
    diff = sum(means) / len(means)
    return {"difference": diff, "stderr": var ** 0.5 / len(means),
            "ratio": row["average"]["value"] / dense["average"]["value"]}


def paired_table(rows: list[dict[str, Any]], dense: dict[str, Any]) -> str:
    lines = ["| model | avg | avg / dense | avg - dense (paired) |", "|---|---|---|---|"]
    for r in rows:
        p = paired(r, dense) if r is not dense else None
        cell = "-" if p is None else f"{p['difference']:+.3f} ± {p['stderr']:.3f}"
        ratio = "-" if r is dense else f"{r['average']['value'] / dense['average']['value']:.3f}"
        lines.append(f"| {r['label']} | {r['average']['value']:.3f} | {ratio} | {cell} |")
    return "\n".join(lines)


def pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of rows (earlier row first) with the later one's paired difference from the earlier one and
    how many standard errors that is: whether the average tells two pruned models apart, not only each from
    dense."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            p = paired(b, a)
            if p is not None:
                out.append({"a": a["name"], "b": b["name"], "difference": p["difference"], "stderr": p["stderr"],
                            "standard_errors": abs(p["difference"]) / p["stderr"] if p["stderr"] else None})
    return out


def pairs_table(found: list[dict[str, Any]]) -> str:
    lines = ["| A | B | avg B - avg A (paired) | in standard errors |", "|---|---|---|---|"]
    for p in found:
        lines.append(f"| {p['a']} | {p['b']} | {p['difference']:+.4f} ± {p['stderr']:.4f} | "
                     f"{_f(p['standard_errors'], '.2f')} |")
    return "\n".join(lines)


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(rows: list[dict[str, Any]], dense_params: int | None) -> str:
    head = ["model", "params", "KV B/tok", "wiki ppl", "LAMBADA ppl", "LAMBADA acc",
            *[f"{t} ({AVERAGE_METRIC[t]})" for t in PAPER_TASKS], "avg ± se"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        removed = f" (-{100 * (1 - r['params'] / dense_params):.1f}%)" if dense_params and r["name"] != "dense" else ""
        cells = [r["label"], f"{r['params'] / 1e6:.1f}M{removed}", f"{r['kv_bytes_per_token']:,}",
                 _f(r["wiki_perplexity"], ".2f"), _f(r["lambada"].get("perplexity"), ".2f"),
                 _f(r["lambada"].get("acc"), ".3f"),
                 *[_f(r["tasks"][t].get(AVERAGE_METRIC[t]), ".3f") for t in PAPER_TASKS],
                 f"{r['average']['value']:.3f} ± {_f(r['average']['stderr'], '.3f')}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="built-in name or checkpoint (default smollm2-135m)")
    p.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated rows (default all)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (default: all)")
    p.add_argument("--calib", default="c4", help="calibration text (default c4, its calibration half)")
    p.add_argument("--eval", default="wiki", help="perplexity text (default wiki, its evaluation half)")
    p.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--windows", type=int, default=10, help="perplexity windows (default 10)")
    p.add_argument("--window-len", type=int, default=1024, help="tokens per perplexity window (default 1024)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration batch size (default 4)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    p.add_argument("--chunk", type=int, default=1000,
                   help="documents per lm-eval call for the seven tasks, each kept as it finishes (default 1000)")
    p.add_argument("--shots", type=int, default=4, help="TransAct shots (default 4, as in `make demo`)")
    p.add_argument("--seed", type=int, default=1234, help="lm-eval seeds (default 1234)")
    p.add_argument("--bootstrap-iters", type=int, default=1000,
                   help="bootstrap draws for LAMBADA's perplexity stderr (default 1000; accuracies are closed-form)")
    p.add_argument("--json", default="benchmarks/results/paper.json", help="where to write the results")
    a = p.parse_args()
    known = {r.name: r for r in ROWS}
    wanted = [n.strip() for n in a.rows.split(",") if n.strip()]
    bad = [n for n in wanted if n not in known]
    if bad:
        p.error(f"unknown row(s) {', '.join(bad)}; rows: {', '.join(known)}")
    if a.chunk < 1:
        p.error(f"--chunk must be at least 1, got {a.chunk}")
    torch.manual_seed(0)

    # Rows measured under other settings are not comparable: only the same settings resume.
    settings = {k: getattr(a, k) for k in ("model", "limit", "calib", "eval", "samples", "seq_len", "windows",
                                           "window_len", "shots", "seed")}
    out = Path(a.json)
    previous = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else None
    done: dict[str, dict[str, Any]] = {}
    partial: dict[str, dict[str, Any]] = {}  # row name -> its tasks measured so far (see row_tasks)
    if previous and previous.get("settings") == settings:
        done = {r["name"]: r for r in previous.get("rows", [])}
        partial = previous.get("partial", {})

    tok = load_tokenizer(resolve_model_path(a.model), a.model)  # the weights are loaded per row
    windows = eval_windows(tok, a.eval, a.windows, a.window_len)
    import lm_eval

    meta = {"settings": settings, "torch": torch.__version__, "lm_eval": lm_eval.__version__,
            "platform": platform.platform(), "threads": torch.get_num_threads(),
            "note": "dequantized Q4 GGUF weights, fp32 on CPU; tasks on their first `limit` documents"}

    def save(**more: Any) -> None:
        order = [n for n in known if n in done]  # keep the table's row order whatever was run first
        extra = {"partial": partial} if partial else {}
        write_json(out, {**meta, "rows": [done[n] for n in order], **more, **extra})

    for name in wanted:
        if name in done:
            print(f"{name}: kept from {out}", flush=True)
            continue
        t0 = time.perf_counter()
        kept = len(partial.get(name, {}).get("tasks", {}))
        if kept:
            print(f"{name}: {kept} task(s) kept from {out}", flush=True)
        done[name] = measure(known[name], a, windows, partial.setdefault(name, {}), save)
        partial.pop(name)
        r = done[name]
        print(f"{name}: wiki ppl {r['wiki_perplexity']:.2f}  lambada ppl {r['lambada']['perplexity']:.2f}  "
              f"avg {r['average']['value']:.3f} ± {r['average']['stderr']:.3f}  [{time.perf_counter() - t0:.0f}s]",
              flush=True)
        if "dense" in done:
            for n in done:
                if n != "dense":
                    done[n]["paired_vs_dense"] = paired(done[n], done["dense"])
        save()

    rows = [done[n] for n in known if n in done]
    found = pairs(rows)
    if found:  # also for rows kept from an earlier run
        save(pairs=found)
    dense = done.get("dense")
    print()
    print(markdown(rows, dense["params"] if dense else None))
    if dense:
        print()
        print(paired_table(rows, dense))
    if found:
        print()
        print(pairs_table(found))


if __name__ == "__main__":
    main()
