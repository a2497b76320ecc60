"""`prunekit compare BASE PRUNED...`: perplexity, zero-shot tasks and speed of several models, side by side,
in one process and one run, with ratios against the base as the headline figures (absolute times on a
shared CPU are noisy; ratios measured back to back are much less so).

Writes report.md, report.json and PNG plots: the base model's per-layer similarity, perplexity vs removed
parameters, and decode speed vs context length.
"""

from __future__ import annotations

import gc
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers

from prunekit import __version__
from prunekit.adapters import get_adapter
from prunekit.data import calibration_data, eval_windows, token_hash
from prunekit.drop import SimilarityScores, score_model
from prunekit.errors import CheckpointError
from prunekit.evaluation.bench import analytic_kv_bytes, benchmark, merge_rounds
from prunekit.evaluation.perplexity import attention_layers, decode_flops_per_token, model_summary, perplexity
from prunekit.evaluation.report import human_bytes, markdown_table, pyplot, save_figure, similarity_heatmap
from prunekit.evaluation.zeroshot import evaluate_tasks
from prunekit.io.checkpoint import check_model_spec, load_model, resolve_model_path
from prunekit.io.files import weight_bytes
from prunekit.io.model_card import check_card_folder, compare_quality, update_measured_quality
from prunekit.io.outputs import atomic_dir, input_paths, prepare_output
from prunekit.jobs.dist import check_device
from prunekit.plans import PruningPlan, checkpoint_plan


@dataclass
class CompareOptions:
    text: str = "wiki"
    windows: int = 10
    window_len: int = 1024
    tasks: list[str] = field(default_factory=list)
    task_dir: str | None = None
    limit: int | None = None
    seed: int = 1234
    contexts: tuple[int, ...] = (128, 512, 1024)
    new_tokens: int = 32
    batch: int = 1
    repeats: int = 3
    bench: bool = True
    interleave: bool = True  # benchmark all models round-robin (all loaded at once) for steadier ratios
    calib: str = "c4"
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True


def _versions() -> dict[str, str]:
    out = {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    try:
        import lm_eval  # the optional `eval` extra: recorded when installed

        out["lm_eval"] = getattr(lm_eval, "__version__", "?")
    except ImportError:
        pass
    return out


def _plan_of(path: str) -> PruningPlan | None:
    """The model's plan, checked (with its scores) against the checkpoint that carries it."""
    return checkpoint_plan(resolve_model_path(path))


def evaluate_one(spec: str, opts: CompareOptions, windows_cache: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Everything measured on one model; the model is freed before returning."""
    model, tok = load_model(spec, dtype=opts.dtype, device=opts.device)
    adapter = get_adapter(model)
    row: dict[str, Any] = {"model": spec, **model_summary(adapter)}
    local = Path(resolve_model_path(spec))
    row["disk_bytes"] = weight_bytes(local) if local.is_dir() else None
    if "ids" not in windows_cache:
        windows_cache["ids"] = eval_windows(tok, opts.text, opts.windows, opts.window_len)
    ids = windows_cache["ids"]
    row["perplexity"] = perplexity(model, ids, progress=opts.progress)["perplexity"]
    row["flops"] = {str(c): decode_flops_per_token(adapter, c) for c in opts.contexts}
    if opts.tasks:
        row["zeroshot"] = evaluate_tasks(model, tok, list(opts.tasks), task_dir=opts.task_dir, limit=opts.limit,
                                         seed=opts.seed, device=opts.device)
    if opts.bench and not opts.interleave:
        row["bench"] = _with_analytic(benchmark(model, contexts=opts.contexts, new_tokens=opts.new_tokens,
                                                batch=opts.batch, repeats=opts.repeats, seed=opts.seed,
                                                progress=opts.progress), adapter, opts, row["disk_bytes"])
    plan = _plan_of(spec)
    if plan is not None:
        row["plan"] = {"method": plan.method, "dropped": [d.to_json() for d in plan.dropped],
                       "widths": bool(plan.widths)}
        if plan.scores:
            row["scores"] = plan.scores
    row["tokens_sha256"] = token_hash(ids)
    del model
    gc.collect()
    return row


def _with_analytic(b: dict[str, Any], adapter: Any, opts: CompareOptions, disk: int | None) -> dict[str, Any]:
    b["disk_bytes"] = disk
    attn = attention_layers(adapter)
    for run in b["runs"]:
        run["kv_bytes_analytic"] = analytic_kv_bytes(adapter.config, run["context"], opts.batch,
                                                     adapter.dtype().itemsize, attn_layers=attn)
    return b


def bench_interleaved(models: Sequence[str], rows: list[dict[str, Any]], opts: CompareOptions) -> None:
    """Speed of every model, measured round-robin: round r runs each model once, so a machine that slows
    down or speeds up during the run affects all models alike and the ratios stay honest."""
    loaded = [load_model(spec, dtype=opts.dtype, device=opts.device, tokenizer=False)[0] for spec in models]
    rounds: list[list[dict[str, Any]]] = [[] for _ in loaded]
    for r in range(opts.repeats):
        if opts.progress:
            print(f"[compare] speed round {r + 1}/{opts.repeats}", file=sys.stderr, flush=True)
        for i, model in enumerate(loaded):
            rounds[i].append(benchmark(model, contexts=opts.contexts, new_tokens=opts.new_tokens, batch=opts.batch,
                                       repeats=1, warmup=1 if r == 0 else 0, seed=opts.seed, progress=False))
    for row, model, res in zip(rows, loaded, rounds):
        row["bench"] = _with_analytic(merge_rounds(res), get_adapter(model), opts, row["disk_bytes"])
    del loaded
    gc.collect()


def _ratios(base: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    r: dict[str, Any] = {
        "params": row["params"] / base["params"],
        "kv_bytes_per_token": row["kv_bytes_per_token"] / base["kv_bytes_per_token"],
        "perplexity": row["perplexity"] / base["perplexity"],
    }
    if base.get("disk_bytes") and row.get("disk_bytes"):
        r["disk_bytes"] = row["disk_bytes"] / base["disk_bytes"]
    if "bench" in row and "bench" in base:
        for rb, rr in zip(base["bench"]["runs"], row["bench"]["runs"]):
            c = str(rr["context"])
            r[f"decode_speedup@{c}"] = rr["decode_tok_s"] / rb["decode_tok_s"]
            r[f"prefill_speedup@{c}"] = rr["prefill_tok_s"] / rb["prefill_tok_s"]
            fb, fr = base["flops"][c], row["flops"][c]
            # Ideal speed-up if time followed the removed attention+MLP compute (layers only), and with
            # the LM head's fixed cost included (the more honest ceiling at this model size).
            r[f"ideal_layers@{c}"] = fb["layers"] / fr["layers"]
            r[f"ideal_total@{c}"] = fb["total"] / fr["total"]
    if "zeroshot" in row and "zeroshot" in base:
        for t, v in row["zeroshot"]["tasks"].items():
            b = base["zeroshot"]["tasks"].get(t)
            if b and b.get("acc"):
                r[f"acc:{t}"] = v["acc"] / b["acc"]
    return r


def _plots(rows: list[dict[str, Any]], out: Path, scores: SimilarityScores | None) -> list[str]:
    plt = pyplot()
    files = []
    if scores is not None:
        similarity_heatmap(scores, out / "similarity.png", title=f"{rows[0]['name']}: per-layer similarity")
        files.append("similarity.png")
    base = rows[0]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        removed = 100 * (1 - r["params"] / base["params"])
        ax.scatter(removed, r["perplexity"], s=40)
        ax.annotate(r["name"], (removed, r["perplexity"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("removed parameters (%)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.set_title("perplexity vs removed parameters")
    files.append(save_figure(fig, out / "perplexity_vs_params.png").name)
    if all("bench" in r for r in rows):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for r in rows:
            runs = r["bench"]["runs"]
            ax.plot([x["context"] for x in runs], [x["decode_tok_s"] for x in runs], marker="o", label=r["name"])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("decode speed vs context")
        files.append(save_figure(fig, out / "speed_vs_context.png").name)
    return files


def compare(models: Sequence[str], out_dir: str | Path, opts: CompareOptions, *,
            force: bool = False, card: str | Path | None = None) -> dict[str, Any]:
    """Measure every model with the same data and settings; write report.md/report.json/plots to out_dir (all
    or nothing; every model and the output folder are checked before the first is measured; an existing
    out_dir is replaced only with `force`). `card`: one of the pruned models (a prunekit checkpoint folder) whose
    model card gets the results beside the base model's ("Measured quality")."""
    check_device(opts.device)
    for spec in models:
        check_model_spec(spec)
        _plan_of(spec)  # a bad plan or bad scores fail now, not after every model was evaluated
    card_row = None if card is None else _card_row(models, card)  # before the measuring
    dest = prepare_output(out_dir, force, inputs=input_paths(*models, opts.text, opts.calib, opts.task_dir))
    with atomic_dir(dest) as out:
        report = _compare(models, out, opts)
    if card is not None and card_row is not None:
        update_measured_quality(card, compare_quality(report, card_row))
    return report


def _card_row(models: Sequence[str], card: str | Path) -> int:
    """The row of `card` among the compared models (not the base, row 0), checked before any measuring."""
    folder = check_card_folder(card).resolve()
    for i, spec in enumerate(models[1:], 1):
        if Path(resolve_model_path(spec)).resolve() == folder:
            return i
    raise CheckpointError(f"--card {card} is not one of the pruned models compared; give one of them "
                          "(the base model is the first)")


def _compare(models: Sequence[str], out: Path, opts: CompareOptions) -> dict[str, Any]:
    t0 = time.time()
    torch.manual_seed(opts.seed)
    cache: dict[str, torch.Tensor] = {}
    rows = []
    for i, spec in enumerate(models):
        print(f"[compare] {i + 1}/{len(models)} {spec}", file=sys.stderr, flush=True)
        row = evaluate_one(spec, opts, cache)
        row["name"] = "base" if i == 0 else Path(str(spec)).name
        rows.append(row)
    if opts.bench and opts.interleave:
        bench_interleaved(models, rows, opts)
    base = rows[0]
    for r in rows:
        r["ratios"] = _ratios(base, r)

    scores = None
    for r in rows:
        # Only LLM-Drop plans carry similarity scores; a width plan's scores are importances.
        if isinstance(r.get("scores"), dict) and "layers" in r["scores"]:
            scores = SimilarityScores.from_json(r["scores"])
            break
    if scores is None:  # no plan carried scores: score the base model on a little calibration text
        model, tok = load_model(models[0], dtype=opts.dtype, device=opts.device)
        cal = calibration_data(tok, opts.calib, 8, 256)
        scores = score_model(model, get_adapter(model), cal, progress=opts.progress)
        del model
    plots = _plots(rows, out, scores)
    report = {"models": list(models), "options": {k: (list(v) if isinstance(v, tuple) else v)
                                                  for k, v in vars(opts).items()},
              "versions": _versions(), "seed": opts.seed, "eval_tokens_sha256": rows[0]["tokens_sha256"],
              "rows": rows, "plots": plots, "seconds": time.time() - t0}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(render_markdown(report, opts))
    return report


def render_markdown(report: dict[str, Any], opts: CompareOptions) -> str:
    rows = report["rows"]
    c_last = str(opts.contexts[-1]) if opts.contexts else None
    table_rows = []
    for r in rows:
        ra = r["ratios"]
        t = {"name": r["name"], "params": f"{r['params'] / 1e6:.2f}M ({ra['params']:.3f}x)",
             "disk": human_bytes(r.get("disk_bytes")),
             "kv": f"{r['kv_bytes_per_token']:,} ({ra['kv_bytes_per_token']:.3f}x)",
             "ppl": f"{r['perplexity']:.2f} ({ra['perplexity']:.3f}x)"}
        for task, v in r.get("zeroshot", {}).get("tasks", {}).items():
            t[f"task:{task}"] = f"{v['acc']:.4f} ± {v['acc_stderr']:.4f}"
        if "bench" in r and c_last:
            run = r["bench"]["runs"][-1]
            t["decode"] = f"{run['decode_tok_s']:.1f} tok/s ({ra.get(f'decode_speedup@{c_last}', 1):.3f}x)"
            t["ideal"] = f"{ra.get(f'ideal_layers@{c_last}', 1):.3f}x / {ra.get(f'ideal_total@{c_last}', 1):.3f}x"
            t["kv_meas"] = f"{human_bytes(run['kv_bytes'])}"
        table_rows.append(t)
    cols = [("name", "model"), ("params", "params"), ("disk", "file size"), ("kv", "KV bytes/token"),
            ("ppl", f"perplexity ({opts.text})")]
    from prunekit.evaluation.zeroshot import expand_task_names  # `paper` -> its seven task columns

    for task in expand_task_names(opts.tasks):
        cols.append((f"task:{task}", f"{task} acc" + (f" (limit {opts.limit})" if opts.limit else "")))
    if opts.bench and c_last:
        cols += [("decode", f"decode @ {c_last}"), ("ideal", "ideal speed-up (layers / with LM head)"),
                 ("kv_meas", f"KV cache @ {c_last}")]
    lines = [
        "# prunekit compare", "",
        f"Perplexity on {opts.windows} windows x {opts.window_len} tokens of `{opts.text}` (held-out half). "
        f"Ratios in parentheses are against the base model, measured in the same run.", "",
        markdown_table(table_rows, cols), "",
    ]
    if opts.bench:
        lines += ["## Speed by context", ""]
        speed_rows = []
        for r in rows:
            for run in r.get("bench", {}).get("runs", []):
                c = str(run["context"])
                speed_rows.append({
                    "name": r["name"], "ctx": run["context"], "prefill": f"{run['prefill_tok_s']:.0f}",
                    "decode": f"{run['decode_tok_s']:.1f}",
                    "speedup": f"{r['ratios'].get(f'decode_speedup@{c}', 1):.3f}x",
                    "ideal": f"{r['ratios'].get(f'ideal_layers@{c}', 1):.3f}x / "
                             f"{r['ratios'].get(f'ideal_total@{c}', 1):.3f}x",
                    "kv": f"{run['kv_bytes']:,}", "kv_a": f"{run.get('kv_bytes_analytic', 0):,}",
                    "rss": human_bytes(run.get("peak_rss_bytes")),
                })
        lines += [markdown_table(speed_rows, [("name", "model"), ("ctx", "context"), ("prefill", "prefill tok/s"),
                                              ("decode", "decode tok/s"), ("speedup", "decode speed-up"),
                                              ("ideal", "ideal (layers / with LM head)"), ("kv", "KV bytes measured"),
                                              ("kv_a", "KV bytes analytic"), ("rss", "peak RSS (process)")]), ""]
        how = ("rounds interleaved across models (each round runs every model once)" if opts.interleave
               else "repeats per model")
        lines.append(f"Decode: median over {opts.repeats} {how}, after warm-up, batch "
                     f"{opts.batch}, {opts.new_tokens} new tokens. Peak RSS is the process high-water mark, so it "
                     "only grows across models evaluated in one run.")
    lines += ["", *[f"![{p}]({p})" for p in report["plots"]], "",
              f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}; seed {report['seed']}; "
              f"evaluation tokens sha256 `{report['eval_tokens_sha256'][:16]}…`."]
    return "\n".join(lines) + "\n"
