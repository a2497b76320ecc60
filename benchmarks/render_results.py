"""Render the results tables of README.md and docs/ from benchmarks/results/*.json, so no number is typed by hand.

Every table lives in its page between `<!-- results:NAME -->` and `<!-- /results:NAME -->`; this script replaces
what is between the two markers with the table `NAME` rendered from its JSON files, followed by the command
that made it and a link to each JSON. `tests/test_docs.py` renders again and fails when a page differs from
what the JSON gives (a hand-edited number, a stale table, a table whose JSON is gone).

    python benchmarks/render_results.py           # rewrite the regions in place
    python benchmarks/render_results.py --check   # exit 1 and name the regions that differ

Links are written relative to the repository root (README.md) and to docs/ (the docs pages, where the mkdocs
hook publishes benchmarks/results/ beside the pages), so `benchmarks/results/X.json` works in both.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = ("README.md", "docs/results.md", "docs/decisions.md")
REGION = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)

Rows = list[list[str]]


# --- formatting -------------------------------------------------------------------------------------------------------
def ppl(x: float | None) -> str:
    if x is None:
        return ""
    if x >= 1e6:
        return f"{x:.1e}"
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.2f}"


def lr(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def pct(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{100 * x:.{digits}f}%"


def millions(n: int | float) -> str:
    return f"{n / 1e6:.1f}M"


def table(head: list[str], rows: Rows, right: set[int] | None = None) -> str:
    right = set(range(1, len(head))) if right is None else right
    sep = ["---:" if i in right else "---" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def link(name: str) -> str:
    return f"[`{name}`](benchmarks/results/{name})"


# --- compress: baselines and the chosen model per budget ---------------------------------------------------------------
_BASELINES = ("LLM-Drop attn", "LLM-Drop mlp", "LLM-Drop block", "LLM-Drop joint", "TransAct uniform MLP")


def compress_rows(sources: list[tuple[str, str | None]]) -> str:
    """One row per (file, budget): every baseline's perplexity, compress's, and compress over the best baseline."""
    rows: Rows = []
    dense: list[tuple[str, float, list[int]]] = []
    for name, only in sources:
        for model, m in load(name)["models"].items():
            key = (model, round(m["dense_ppl"], 2), m["eval_windows"])
            if key not in dense:
                dense.append(key)
            for budget, b in m["budgets"].items():
                if only is not None and budget != only:
                    continue
                c = b["compress"]
                base = [b.get(k, {}).get("ppl") for k in _BASELINES]
                best = min((p for p in base if p is not None), default=None)
                rows.append([f"{model}, {budget}", *[ppl(p) for p in base], f"**{ppl(c['ppl'])}**", c["chosen"],
                             ratio(c["ppl"] / best) if best else "", pct(c["removed_params"]),
                             f"{c['seconds']:.0f} s" if "seconds" in c else "",
                             f"{c['peak_rss_gib']:.1f} GiB" if "peak_rss_gib" in c else "", link(name)])
    head = ["model, budget", "LLM-Drop attn", "LLM-Drop MLP", "LLM-Drop block", "LLM-Drop joint",
            "TransAct uniform MLP", "compress", "chosen family", "x best", "removed", "time", "peak RSS", "JSON"]
    evals = "; ".join(f"{w[0]} x {w[1]} held-out tokens, dense {model} {ppl(p)}" for model, p, w in dense)
    return (table(head, rows, right={1, 2, 3, 4, 5, 6, 8, 9, 10, 11})
            + f"\n\nWiki perplexity on {evals}. \"x best\" is compress over the best baseline at the same budget.")


def compress_candidates(name: str, model: str, budget: str) -> str:
    """Every candidate of one compress search: removed parameters and KV, check perplexity, the chosen one."""
    c = load(name)["models"][model]["budgets"][budget]["compress"]
    rows = [[x["name"], pct(x["removed_params"]), pct(x["removed_kv"]), ppl(x["check_ppl"])]
            for x in c["candidates"]]
    return (table(["candidate", "removed params", "removed KV", "check ppl"], rows)
            + f"\n\nChosen: {c['chosen']} (wiki {ppl(c['ppl'])}). JSON: {link(name)}.")


def calibration_rows(names: list[str]) -> str:
    rows: Rows = []
    for name in names:
        d = load(name)
        for run, r in d["runs"].items():
            rows.append([d.get("calibration", "c4"), run, ppl(r["lambada"]), ppl(r["wiki"]),
                         f"{r['seconds']:.0f} s", r["chosen"], link(name)])
    return table(["calibration", "sequences x tokens, rounds", "LAMBADA ppl", "wiki ppl", "time", "chosen", "JSON"],
                 rows, right={2, 3, 4})


def correct_inputs(name: str) -> str:
    d = load(name)
    rows = [[r["setting"], ppl(r["check_ppl"]), ppl(r["wiki_ppl"]), f"{r['seconds']:.0f} s"] for r in d["rows"]]
    return table(["error correction", "check ppl", "wiki ppl", "correction time"], rows) + f"\n\nJSON: {link(name)}."


def compress_stream(names: list[str]) -> str:
    rows: Rows = []
    for name in names:
        d = load(name)
        for mode, r in d["runs"].items():
            rows.append([d["model"], d["budget"], mode, r["chosen"], ppl(d["wiki_ppl"][mode]),
                         f"{r['seconds']:.0f} s", f"{r['peak_rss_gib']:.2f} GiB", link(name)])
    return table(["model", "budget", "mode", "chosen", "wiki ppl", "time", "peak RSS", "JSON"], rows,
                 right={4, 5, 6})


# --- LLM-Drop criterion, linear repair, width ------------------------------------------------------------------------
def criterion(name: str) -> str:
    d = load(name)
    rows = [[r["criterion"], " ".join(x.split("@")[1] for x in r["dropped"]), ppl(r["wiki_perplexity"]),
             "" if r["forward_passes"] is None else f"{r['forward_passes']:g}", f"{r['choose_seconds']:.0f}"]
            for r in d["rows"]]
    return table(["criterion", "dropped attention layers", "wiki ppl", "search cost (forward passes)", "seconds"],
                 rows, right={2, 3, 4}) + f"\n\nJSON: {link(name)}."


def repair(name: str) -> str:
    d = load(name)
    rows = [[r["model"], ppl(r["perplexity"]), f"**{ppl(r['perplexity_repaired'])}**" if "spans" in r else "",
             f"{r['spans_applied']}/{r['spans']}" if "spans" in r else ""] for r in d["rows"]]
    return table(["LLM-Drop plan (cosine)", "unrepaired", "linear repair", "maps kept"], rows) + \
        f"\n\nJSON: {link(name)}."


def width(name: str) -> str:
    d = load(name)
    dense = d["rows"][0]["perplexity"]
    rows = [[r["name"], millions(r["removed"]), f"{r['removed_pct']:.1f}%", ppl(r["perplexity"]),
             f"{r['perplexity'] / dense:.2f}x", f"{r['prune_s']:.0f} s"] for r in d["rows"]]
    e = d["eval"]
    return (table(["configuration", "removed", "removed %", "wiki ppl", "x dense", "prune time"], rows)
            + f"\n\nWiki perplexity on {e['windows']} x {e['window_len']} held-out tokens. JSON: {link(name)}.")


# --- healing ---------------------------------------------------------------------------------------------------------
def heal_rows(sources: list[tuple[str, bool]]) -> str:
    """Rows of `bench_heal.py` files; the flag keeps the dense and unhealed rows of that file too."""
    rows: Rows = []
    for name, baselines in sources:
        d = load(name)
        for r in d["rows"]:
            if "tokens_seen" not in r and not baselines:
                continue
            how = ""
            if "tokens_seen" in r:
                rate = r.get("lr") or d["settings"]["lr"]
                how = f"lr {lr(rate)}, batch {d['settings']['batch_size']} x {d['settings']['steps']}"
            cells = [r["row"], how, f"{r['tokens_seen']:,}" if "tokens_seen" in r else ""]
            for k in ("", "_2", "_3"):
                cells.append(f"{ppl(r.get('perplexity' + k))} ({r['ratio_to_dense' + k]:.3f}x)"
                             if r.get("perplexity" + k) is not None else "")
            cells += [f"{r['minutes']:.1f}" if "minutes" in r else "",
                      f"{r['peak_rss_gib']:.2f} GiB" if "peak_rss_gib" in r else "", link(name)]
            rows.append(cells)
    return table(["row", "lr, batch x steps", "training tokens", "wiki ppl (x dense)", "c4 ppl (x dense)",
                  "LAMBADA ppl (x dense)", "minutes", "peak RSS", "JSON"], rows, right={2, 3, 4, 5, 6, 7})


def _recipe(r: dict[str, Any], s: dict[str, Any]) -> str:
    loss = {1.0: "causal LM", 0.0: "distillation"}.get(r["alpha"], f"{1 - r['alpha']:g} distillation + "
                                                                    f"{r['alpha']:g} causal LM")
    extra = []
    if r.get("hidden_weight"):
        extra.append(f"hidden x {r['hidden_weight']:g}")
    if r.get("temperature", 1.0) != 1.0:
        extra.append(f"T={r['temperature']:g}")
    return ", ".join([loss, f"lr {lr(r['lr'])}", *extra, f"batch {s['batch_size']} x {s['steps']} steps"])


def heal_recipe(name: str) -> str:
    """A `bench_heal_recipe.py` file (one run, or several under "runs"): selection-window perplexities."""
    d = load(name)
    runs = d.get("runs", [d])
    rows: Rows = []
    for i, run in enumerate(runs):
        for r in run["rows"]:
            if "lr" not in r and i > 0:
                continue
            label = _recipe(r, run["settings"]) if "lr" in r else r["row"]
            rows.append([label, ppl(r["wiki"]), ppl(r["c4"]), f"{r['mean_log']:.4f}"])
    return (table(["recipe", "wiki (selection)", "c4 (selection)", "mean log ppl"], rows)
            + f"\n\nJudged on 16 x 512 calibration-half windows that no run read. JSON: {link(name)}.")


# --- zero-shot tasks -------------------------------------------------------------------------------------------------
_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")


def paper(name: str, tasks: bool = True) -> str:
    d = load(name)
    rows: Rows = []
    dense = d["rows"][0]["params"]
    for r in d["rows"]:
        removed = "" if r["params"] == dense else f" (-{100 * (1 - r['params'] / dense):.1f}%)"
        cells = [r["label"], millions(r["params"]) + removed, f"{r['kv_bytes_per_token']:,}",
                 ppl(r["wiki_perplexity"]), ppl(r["lambada"]["perplexity"]), f"{r['lambada']['acc']:.3f}"]
        if tasks:
            cells += [f"{r['tasks'][t][r['tasks'][t]['average_metric']]:.3f}" for t in _TASKS]
        a = r["average"]
        cells.append(f"{a['value']:.3f} ± {a['stderr']:.3f}")
        p = r.get("paired_vs_dense")
        cells.append(f"{p['difference']:+.3f} ± {p['stderr']:.3f}" if p else "")
        rows.append(cells)
    head = ["model", "params", "KV B/tok", "wiki ppl", "LAMBADA ppl", "LAMBADA acc"]
    head += list(_TASKS) if tasks else []
    head += ["avg ± se", "avg - dense (paired)"]
    s = d["settings"]
    limit = "every question" if s["limit"] is None else f"the first {s['limit']} questions of each task"
    return (table(head, rows, right=set(range(1, len(head))))
            + f"\n\n{s['model']}, {limit}; calibration {s['samples']} x {s['seq_len']} tokens of {s['calib']}, "
              f"wiki perplexity on {s['windows']} x {s['window_len']} held-out tokens. JSON: {link(name)}.")


def pairs(name: str) -> str:
    rows = [[p["a"], p["b"], f"{p['difference']:+.4f} ± {p['stderr']:.4f}", f"{p['standard_errors']:.2f}"]
            for p in load(name)["pairs"]]
    return table(["A", "B", "avg B - avg A (paired)", "standard errors"], rows, right={2, 3})


# --- speed and memory ------------------------------------------------------------------------------------------------
def engine(name: str, context: int = 2048) -> str:
    d = load(name)
    rows: Rows = []
    for quant in ("f16", "q8_0"):
        for r in d["runs"]:
            if r["context"] != context or r["quant"] != quant:
                continue
            q1, q3 = r["decode_ratio_q1_q3"]
            rows.append([r["variant"], quant, pct(r["removed"]), f"{r['prefill_tok_s']:.0f}",
                         f"{r['prefill_ratio']:.2f}", f"{r['prefill_flop_ratio']:.2f}", f"{r['decode_tok_s']:.1f}",
                         f"{r['decode_ratio']:.2f} ({q1:.2f}-{q3:.2f})", f"{r['ideal_decode_ratio']:.2f}",
                         pct(r["decode_of_ideal"], 0)])
    head = ["variant", "type", "weights removed", "prefill tok/s", "prefill x", "FLOP x", "decode tok/s",
            "decode x (q1-q3)", "ideal x", "% of ideal"]
    return (table(head, rows, right=set(range(2, len(head))))
            + f"\n\n{d['engine']}; {d['threads']} thread(s), {context} tokens of context, {d['rounds']} rounds. "
              f"JSON: {link(name)}.")


def engine_memory(name: str) -> str:
    d = load(name)
    rows = []
    for key, m in d["memory"].items():
        variant, quant = key.split("/")
        rows.append([variant, quant, f"{d['costs'][key]['tensor_bytes'] / 2**20:.1f}",
                     f"{m['kv_bytes'] / 2**20:.1f}", f"{m['peak_rss_bytes'] / 2**20:.0f}",
                     f"{(m['peak_rss_bytes'] - m['baseline_rss_bytes']) / 2**20:.0f}"])
    return table(["variant", "type", "weights MiB", "KV cache MiB", "peak RSS MiB", "added MiB"], rows,
                 right={2, 3, 4, 5}) + f"\n\nJSON: {link(name)}."


def stream(name: str) -> str:
    d = load(name)
    ck = d["summary"]["checkpoint_bytes"]
    rows = [[run, f"{r['seconds']:.1f} s", f"{r['peak_rss_bytes'] / 2**30:.2f} GiB", pct(r["peak_rss_bytes"] / ck, 0)]
            for run, r in d["runs"].items()]
    return (table(["run", "time", "peak RSS", "of the checkpoint"], rows)
            + f"\n\nA {ck / 1e9:.1f} GB synthetic Llama ({d['model']['num_hidden_layers']} layers, hidden "
              f"{d['model']['hidden_size']}). JSON: {link(name)}.")


def scoring(name: str) -> str:
    d = load(name)
    rows = [["scores with the pairwise matrix", f"{d['ratio_pairwise']:.2f}x"],
            ["scores without it", f"{d['ratio']:.2f}x"]]
    return (table(["LLM-Drop scoring", "time / plain forward"], rows)
            + f"\n\n{d['samples']} x {d['seq_len']} tokens, median over {d['repeats']} interleaved rounds. "
              f"JSON: {link(name)}.")


def trust(name: str) -> str:
    d = load(name)
    rows = [[r["case"], r["what"], str(r["rc"]), "yes" if r["ok"] else "**no**"] for r in d["rows"]]
    ok = sum(r["ok"] for r in d["rows"])
    return (table(["case", "what", "exit code", "as expected"], rows, right={2})
            + f"\n\n{ok} of {len(d['rows'])} cases as expected. JSON: {link(name)}.")


# --- the registry ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    command: str
    render: Callable[[], str]


def _t(command: str, render: Callable[[], str]) -> Table:
    return Table(command, render)


TABLES: dict[str, Table] = {
    "headline": _t("python benchmarks/bench_paper.py --limit 100",
                   lambda: paper("paper_limit100.json", tasks=False)),
    "paper-smollm2-100": _t("python benchmarks/bench_paper.py --limit 100", lambda: paper("paper_limit100.json")),
    "paper-smollm2-full": _t("python benchmarks/bench_paper.py --rows dense,attn-drop-8,block-drop-4 "
                             "--json benchmarks/results/paper_full.json",
                             lambda: paper("paper_full.json") + "\n\n" + pairs("paper_full.json")),
    "paper-qwen": _t("python benchmarks/bench_paper.py --model qwen2.5-coder-1.5b --limit 20 --windows 4 --samples 8 "
                     "--json benchmarks/results/paper_qwen2.5-coder-1.5b.json",
                     lambda: paper("paper_qwen2.5-coder-1.5b.json")),
    "paper-qwen-100": _t("python benchmarks/bench_paper.py --model qwen2.5-coder-1.5b --limit 100 --windows 4 "
                         "--samples 8 --rows dense,attn-drop-8 "
                         "--json benchmarks/results/paper_qwen2.5-coder-1.5b_limit100.json",
                         lambda: paper("paper_qwen2.5-coder-1.5b_limit100.json")),
    "criterion": _t("python benchmarks/bench_criterion.py --prefilter 4", lambda: criterion("criterion.json")),
    "repair": _t("python benchmarks/bench_repair.py", lambda: repair("repair.json")),
    "width": _t("python benchmarks/bench_width.py", lambda: width("width.json")),
    "compress-smollm2": _t("python benchmarks/bench_compress.py --models smollm2-135m "
                           "--json benchmarks/results/compress_smollm2_corr.json; params=0.8 again with "
                           "--budgets 0.8 --kv 0 --json benchmarks/results/compress_smollm2_top2corr_p08.json",
                           lambda: compress_rows([("compress_smollm2_corr.json", "params=0.9"),
                                                  ("compress_smollm2_top2corr_p08.json", "params=0.8"),
                                                  ("compress_smollm2_corr.json", "kv=0.5")])),
    "compress-gemma3": _t("python benchmarks/bench_compress.py --models gemma3-270m --budgets 0.9 --kv 0 "
                          "(and --budgets 0.8 --kv 0; --budgets '' --kv 0.5) --json ...",
                          lambda: compress_rows([("compress_gemma3_top2corr_p09.json", None),
                                                 ("compress_gemma3_nearuniform_p08.json", None),
                                                 ("compress_gemma3_corr_kv.json", None)])),
    "compress-candidates-smollm2": _t("python benchmarks/bench_compress.py --models smollm2-135m --budgets 0.8 "
                                      "--kv 0 --json benchmarks/results/compress_smollm2_top2corr_p08.json",
                                      lambda: compress_candidates("compress_smollm2_top2corr_p08.json",
                                                                  "smollm2-135m", "params=0.8")),
    "compress-calibration": _t("python benchmarks/bench_compress_calibration.py --configs 64x2|128x2 --calib ...",
                               lambda: calibration_rows(["compress_calibration.json", "compress_calibration_c4_64.json",
                                                         "compress_calibration_mix64.json",
                                                         "compress_calibration_mix128.json"])),
    "compress-stream": _t("python benchmarks/bench_compress_stream.py (and --model qwen2.5-coder-1.5b --budget "
                          "params=0.9 --samples 8 --windows 4 --modes stream)",
                          lambda: compress_stream(["compress_stream.json", "compress_stream_qwen1.5b.json"])),
    "compress-measured": _t("python benchmarks/bench_compress.py ... --probe-samples 8",
                            lambda: compress_rows([("compress_smollm2_measured_p08.json", None),
                                                   ("compress_gemma3_measured_p09.json", None)])),
    "compress-no-correction": _t("python benchmarks/bench_compress.py --models smollm2-135m (before --correct)",
                                 lambda: compress_rows([("compress_smollm2_obs.json", None),
                                                        ("compress_smollm2_s64.json", None)])),
    "compress-kl": _t("python benchmarks/bench_compress.py --models smollm2-135m --budgets 0.8 --kv 0 --criterion kl",
                      lambda: compress_rows([("compress_kl_smollm2.json", None)])),
    "compress-gemma3-kv-history": _t("python benchmarks/bench_compress.py --models gemma3-270m --budgets '' --kv 0.5",
                                     lambda: compress_rows([("compress_gemma3_kv.json", None),
                                                            ("compress_gemma3_fixedrms_kv.json", None),
                                                            ("compress_gemma3_corr_kv.json", None)])),
    "correct-inputs": _t("python benchmarks/bench_correct_inputs.py", lambda: correct_inputs(
        "correct_inputs_smollm2_p08.json")),
    "heal-attn8": _t("python benchmarks/bench_heal.py --rows distill,ce --lr 2e-4 --alpha 0.5",
                     lambda: heal_rows([("heal_lr2e-4.json", True), ("heal_lora_recipe.json", False)])),
    "heal-old-defaults": _t("python benchmarks/bench_heal.py --rows distill,ce (lr 5e-5, pure KL; c4 only for "
                            "heal_204k)",
                            lambda: heal_rows([("heal_204k.json", False), ("heal_mix.json", False)])),
    "heal-teacher": _t("python benchmarks/bench_heal.py --text c4 --steps 16 --rows distill,ce,teacher "
                       "(and --steps 35 --rows ce)",
                       lambda: heal_rows([("heal_teacher_recipe.json", False),
                                          ("heal_teacher_ce_equal_time.json", False)])),
    "heal-heavy": _t("python benchmarks/bench_heal.py --prune mlp|compress --rows distill [--lr 5e-4 --steps 122 | "
                     "--batch-size 1 --steps 488]",
                     lambda: heal_rows([("heal_mlp50_recipe.json", True), ("heal_mlp50_lr5e-4.json", False),
                                        ("heal_mlp50_b1.json", False), ("heal_compress30_b1_corr.json", True),
                                        ("heal_compress20_recipe.json", True)])),
    "heal-recipe": _t("python benchmarks/bench_heal_recipe.py", lambda: heal_recipe("heal_recipe.json")),
    "heal-recipe-mlp50": _t("python benchmarks/bench_heal_recipe.py --prune mlp --rows ... [--batch-size B --steps S]",
                            lambda: heal_recipe("heal_recipe_mlp50.json")),
    "engine": _t("python benchmarks/bench_engine.py --threads 1 --rounds 4 --decode-repeats 2 --new-tokens 32",
                 lambda: engine("engine.json")),
    "engine-threads2": _t("python benchmarks/bench_engine.py --threads 2 "
                          "--json benchmarks/results/engine_threads2.json", lambda: engine("engine_threads2.json")),
    "engine-memory": _t("python benchmarks/bench_engine.py --threads 1 --rounds 4 --decode-repeats 2",
                        lambda: engine_memory("engine.json")),
    "stream": _t("python benchmarks/bench_stream.py", lambda: stream("stream.json")),
    "scoring": _t("python benchmarks/bench_scoring.py", lambda: scoring("scoring.json")),
    "trust": _t("python benchmarks/bench_trust.py", lambda: trust("trust_cases.json")),
}


def render(name: str) -> str:
    if name not in TABLES:
        raise KeyError(f"unknown results table {name!r} (known: {', '.join(TABLES)})")
    t = TABLES[name]
    return f"{t.render()}\n\nMade by: `{t.command}`\n"


def _nan_free(text: str) -> str:
    if "nan" in text.split("|"):
        raise ValueError("a rendered table holds NaN")
    return text


def rendered(text: str) -> str:
    """`text` with every results region replaced by its table."""
    return REGION.sub(lambda m: m.group(1) + _nan_free(render(m.group("name"))) + m.group(4), text)


def regions(text: str) -> list[str]:
    return [m.group("name") for m in REGION.finditer(text)]


def stale(root: Path = ROOT) -> list[str]:
    """'page: region' for every region whose text differs from what the JSON gives."""
    out = []
    for page in PAGES:
        text = (root / page).read_text()
        new = {m.group("name"): m.group("body") for m in REGION.finditer(rendered(text))}
        old = {m.group("name"): m.group("body") for m in REGION.finditer(text)}
        out += [f"{page}: {n}" for n in old if old[n] != new[n]]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report regions that differ (exit 1 if any)")
    a = p.parse_args()
    if a.check:
        bad = stale()
        for b in bad:
            print(f"stale: {b}", file=sys.stderr)
        return 1 if bad else 0
    for page in PAGES:
        path = ROOT / page
        text = path.read_text()
        new = rendered(text)
        if new != text:
            path.write_text(new)
            print(f"rendered {', '.join(regions(text))} into {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
