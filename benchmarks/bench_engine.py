"""llama.cpp speed of dense vs pruned GGUF exports (prefill and decode tokens/s), next to the ideal ratio.

Each variant of the model is pruned in memory with a hand-written plan (the structure matters here, not which
layers a scorer would pick), exported to GGUF (f16 always; q8_0 when llama-cpp-python's quantizer is
installed) and loaded once in an in-process llama.cpp server (xllamacpp). Rounds are interleaved (every
round runs every variant at every context) so drift in the shared machine's load hits all variants alike;
the table reports medians. "ideal" is the tensor-byte ratio dense/pruned of the GGUF files, what decode would
gain if it were purely memory-bound (the KV cache and fixed overheads are left out, so it is an upper bound).

    PYTHONPATH=src python benchmarks/bench_engine.py [--model smollm2-135m] [--contexts 128,512,2048] \\
        [--new-tokens 32] [--rounds 3] [--threads 2] [--json benchmarks/results/engine.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

from prunekit.export import ExportError, export_source
from prunekit.export.common import layer_shapes, load_source
from prunekit.export.engines import XServer, have_llama_cpp
from prunekit.plans import DropTarget, LayerWidth, PruningPlan
from prunekit.surgery import apply_plan


def plans(n_layers: int, n_ff: int) -> dict[str, PruningPlan | None]:
    """Dense plus three structures, each removing roughly a quarter of the decoder's work."""
    last = list(range(n_layers // 2, n_layers))
    quarter = max(1, n_layers // 4)
    return {
        "dense": None,
        "attn-drop": PruningPlan(dropped=[DropTarget(i, "attn") for i in last[::2][: quarter * 2]]),
        "block-drop": PruningPlan(dropped=[DropTarget(i, "block") for i in last[-quarter:]]),
        "mlp-width-0.5": PruningPlan(widths={i: LayerWidth(channels=list(range(n_ff // 2)))
                                             for i in range(n_layers)}),
    }


def describe(plan: PruningPlan | None) -> dict:
    if plan is None:
        return {}
    widths = {str(i): {k: len(v) for k, v in w.to_json().items()} for i, w in plan.widths.items()}
    return {"dropped": [d.to_json() for d in plan.dropped], "kept_widths": widths}


def tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


def prompt_tokens(tok, n: int) -> list[int]:
    from prunekit.data import eval_windows

    return eval_windows(tok, "wiki", 1, n)[0].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", default="128,512,2048")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quants", default="f16,q8_0")
    p.add_argument("--json", default="benchmarks/results/engine.json")
    a = p.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    quants = [q for q in a.quants.split(",") if q in ("f16", "f32") or have_llama_cpp()]
    skipped = sorted(set(a.quants.split(",")) - set(quants))

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as work:
        run(a, contexts, quants, skipped, Path(work))


def run(a: argparse.Namespace, contexts: list[int], quants: list[str], skipped: list[str], work: Path) -> None:
    base = load_source(a.model)
    cfg = base.config
    variants = plans(len(base.shapes), int(cfg.intermediate_size))
    files: dict[tuple[str, str], Path] = {}
    for name, plan in variants.items():
        src = load_source(a.model) if plan is not None else base
        if plan is not None:
            apply_plan(src.adapter, plan)
            src.shapes = layer_shapes(src.adapter)
        for q in quants:
            try:
                files[name, q] = export_source(src, work / f"{name}-{q}.gguf", format="gguf", quant=q,
                                               progress=False)
            except ExportError as e:
                print(f"skip {name} {q}: {e}")
        del src

    prompts = {c: prompt_tokens(base.tokenizer, c) for c in contexts}
    n_ctx = max(contexts) + a.new_tokens + 8
    servers = {k: XServer(f, n_ctx=n_ctx, threads=a.threads) for k, f in files.items()}
    samples: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    for s in servers.values():  # warm-up: page the weights in, build graphs
        s.complete(prompts[contexts[0]], 4)
    for r in range(a.rounds):
        for c in contexts:
            for key, s in servers.items():
                out = s.complete(prompts[c], a.new_tokens)
                d = samples.setdefault((*key, c), {"prefill": [], "decode": []})
                d["prefill"].append(out.prompt_n / out.prompt_ms * 1e3)
                d["decode"].append(out.predicted_n / out.predicted_ms * 1e3)
        print(f"round {r + 1}/{a.rounds} done", flush=True)
        report(a, samples, files, variants, skipped, rounds_done=r + 1)
    for s in servers.values():
        s.close()



def report(a: argparse.Namespace, samples: dict, files: dict, variants: dict, skipped: list[str], *,
           rounds_done: int) -> None:
    """Medians so far -> table (final round only) and JSON (after every round: a run cut short keeps its data)."""
    runs = []
    for (name, q, c), d in sorted(samples.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        dense = samples[("dense", q, c)]
        size, dense_size = tensor_bytes(files[name, q]), tensor_bytes(files["dense", q])
        pre, dec = statistics.median(d["prefill"]), statistics.median(d["decode"])
        runs.append({
            "variant": name, "quant": q, "context": c, "tensor_bytes": size,
            "prefill_tok_s": pre, "decode_tok_s": dec,
            "prefill_ratio": pre / statistics.median(dense["prefill"]),
            "decode_ratio": dec / statistics.median(dense["decode"]),
            "ideal_ratio": dense_size / size,
            "samples": d,
        })
    print(f"\n{'variant':<15}{'type':<6}{'ctx':>6}{'MB':>8}{'prefill t/s':>13}{'decode t/s':>12}"
          f"{'prefill x':>11}{'decode x':>10}{'ideal x':>9}")
    for r in runs:
        print(f"{r['variant']:<15}{r['quant']:<6}{r['context']:>6}{r['tensor_bytes'] / 1e6:>8.1f}"
              f"{r['prefill_tok_s']:>13.1f}{r['decode_tok_s']:>12.1f}{r['prefill_ratio']:>11.2f}"
              f"{r['decode_ratio']:>10.2f}{r['ideal_ratio']:>9.2f}")
    result = {
        "model": a.model, "engine": "llama.cpp via xllamacpp 2026.10.11549 (CPU)", "threads": a.threads,
        "new_tokens": a.new_tokens, "rounds": rounds_done, "rounds_asked": a.rounds,
        "statistic": "median over interleaved rounds",
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "skipped_quants": skipped, "plans": {k: describe(v) for k, v in variants.items()},
        "runs": runs,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.json} after round {rounds_done}" + (f" (skipped {', '.join(skipped)}: llama-cpp-python not installed)" if skipped else ""))


if __name__ == "__main__":
    main()
