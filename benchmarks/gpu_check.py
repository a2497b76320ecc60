"""The GPU check (issue #42): prunekit's jobs on a CUDA device against the CPU, at scale, and for speed.

Device command (run from the repository root on the device machine; the JSON comes back under $OUT, to be
copied to benchmarks/results/gpu_check.json):

    timeout 470 python3 benchmarks/gpu_check.py --device cuda --sizes tiny,smollm2,llama8b --budget-s 420 --out "$OUT/gpu_check.json"

It needs the tree and a Python with torch, transformers, peft, safetensors and accelerate only: prunekit is
imported from `src/`; models are built from configs with random weights (no model assets, no internet);
the tokenizer is a word-level one built here and the text is random words (random-token calibration).

Sections (each guarded: a failure or a timeout is recorded in the JSON and the next section runs):

* correctness, on every size but llama8b (tiny: 4 layers, hidden 64; smollm2: SmolLM2-135M's shape, 30
  layers, hidden 576, heads 9/3, MLP 1536, vocab 49152): `score`, `drop` (attention), `width`, `compress`
  (params=0.8, small calibration), a 20-step `heal --teacher`, `eval` and `bench`, run once on the CPU in
  float32 and on `--device` in float32 and bfloat16. Float32 on the device must give the CPU's plans, scores
  within `TOL["score_f32"]`, perplexity and heal losses within their relative tolerances; bfloat16 must give
  the same drop and width plans (its scores and losses are reported, with looser tolerances).
* scale, on llama8b (Llama-3-8B's shape in bfloat16, random weights) or, without it, the largest size given:
  scoring time against a plain forward pass of the same batches on the same device (model in memory);
  layer-streamed scoring's peak device memory against one layer + the head + the embedding + the
  calibration states; `compress --budget params=0.8` (small calibration) wall time and peak device memory
  against prunekit's own estimate (`compress.memory_estimate`). The on-disk checkpoint that streaming and
  compress read has `--scale-layers` layers of the full shape: the peak does not depend on the depth, and all
  32 layers' float64 Grams (55 GB) exceed compress's share of the device machine's memory, so they would
  spill to its 64 GB disk beside a 16 GB checkpoint.
* speed, on the same model in memory: `bench` of the dense model and of the model with its 8 most redundant
  attention layers dropped (LLM-Drop), prefill and decode tokens/s.

Randomly initialised layers all look alike, which would make every plan a coin toss between near-ties; each
layer's attention and MLP output projections are therefore scaled by distinct factors (a shuffled geometric
series), so the modules' importance is well separated and the plans are a fair comparison across devices.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=4, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=True),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    num_hidden_layers=30, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    num_hidden_layers=32, vocab_size=128256, max_position_embeddings=8192,
                    tie_word_embeddings=False),
}
# Per size: calibration, the jobs' settings and the bench contexts (small: the whole check is 8 minutes).
RUNS: dict[str, dict[str, Any]] = {
    "tiny": dict(samples=8, seq_len=32, batch_size=4, drop_n=1, multiple_of=16, heal_seq=32, heal_batch=2,
                 windows=4, window_len=64, contexts=(32,), new_tokens=8, scale_drop=2),
    "smollm2": dict(samples=8, seq_len=128, batch_size=4, drop_n=8, multiple_of=64, heal_seq=128, heal_batch=2,
                    windows=4, window_len=256, contexts=(256,), new_tokens=16, scale_drop=8),
    "llama8b": dict(samples=8, seq_len=256, batch_size=4, drop_n=8, multiple_of=64, heal_seq=128, heal_batch=2,
                    windows=4, window_len=256, contexts=(512,), new_tokens=32, scale_drop=8),
}
# What "the same" means across devices. Float32 scores are means of cosines over tokens in float64 sums;
# different kernels (TF32 is off: torch's default for matmuls) move them by ~1e-6.
TOL = {"score_f32": 1e-4, "score_bf16": 3e-2, "ppl_rel_f32": 1e-3, "ppl_rel_bf16": 5e-2,
       "heal_rel_f32": 1e-2, "heal_rel_bf16": 1e-1}
HEAL_STEPS = 20


def stub_matplotlib() -> str:
    """`compress` draws pareto.png with matplotlib, which the device image may lack: there, a stand-in that
    draws nothing takes its place (the check reads pareto.json, never the picture)."""
    try:
        import matplotlib  # noqa: F401

        return "present"
    except ImportError:
        pass
    import types

    class Anything:
        def __getattr__(self, name: str) -> Anything:
            return self

        def __call__(self, *args: Any, **kwargs: Any) -> Anything:
            return self

    pyplot = types.ModuleType("matplotlib.pyplot")
    pyplot.subplots = lambda *a, **k: (Anything(), Anything())  # type: ignore[attr-defined]
    pyplot.close = lambda *a, **k: None  # type: ignore[attr-defined]
    mpl = types.ModuleType("matplotlib")
    mpl.use = lambda *a, **k: None  # type: ignore[attr-defined]
    mpl.pyplot = pyplot  # type: ignore[attr-defined]
    sys.modules.update({"matplotlib": mpl, "matplotlib.pyplot": pyplot})
    return "missing: a stand-in that draws nothing (no pareto.png)"


class SectionTimeout(Exception):
    """The check's time budget ran out inside a section."""


# ----------------------------------------------------------------------------------------------- helpers
def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for name in ("transformers", "peft", "safetensors", "accelerate", "tokenizers"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - recorded, not fatal: prunekit may not need it
            out[name] = f"missing ({type(e).__name__})"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    import prunekit

    out["prunekit"] = prunekit.__version__
    out["prunekit_path"] = str(Path(prunekit.__file__).parent)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Peak memory while the block runs: the CUDA allocator's peak on a GPU, else the process's peak RSS."""
    box: dict[str, int] = {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield box
        sync(device)
        box.update(peak_bytes=int(torch.cuda.max_memory_allocated(device)), before_bytes=int(base),
                   peak_reserved_bytes=int(torch.cuda.max_memory_reserved(device)))
    else:
        from prunekit.evaluation.bench import PeakRSS

        with PeakRSS() as rss:
            base = rss.peak
            yield box
        box.update(peak_bytes=int(rss.peak), before_bytes=int(base))


def _grown(peak: dict[str, int]) -> int:
    """What a block added at its peak to what was held before it (the process itself, on the CPU)."""
    return peak["peak_bytes"] - peak["before_bytes"]


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Clock:
    """The check's time budget; `alarm` bounds one section by what is left of it."""

    def __init__(self, budget_s: float, on_step: Callable[[], None] = lambda: None):
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.on_step = on_step  # after every step: the JSON so far is written (a killed run keeps it)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    @contextmanager
    def alarm(self, reserve_s: float = 0.0) -> Iterator[None]:
        seconds = math.floor(self.left() - reserve_s)
        if seconds < 1:
            raise SectionTimeout("no time left in --budget-s")

        def ring(signum: int, frame: Any) -> None:
            raise SectionTimeout(f"the --budget-s of {self.budget_s:g} s ran out")

        previous = signal.signal(signal.SIGALRM, ring)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


def guarded(record: dict[str, Any], name: str, clock: Clock, fn: Callable[[], dict[str, Any]],
            reserve_s: float = 0.0) -> dict[str, Any] | None:
    """Run one step; its result, or its error, goes to `record[name]` with its wall time."""
    t0 = time.perf_counter()
    try:
        with clock.alarm(reserve_s):
            result = fn()
        record[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 3), **result}
        return record[name]
    except (Exception, SectionTimeout) as e:  # noqa: BLE001 - every failure is a result of this check
        record[name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 3),
                        "error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}",
                        "traceback": traceback.format_exc(limit=6)[-2000:]}
        print(f"[gpu_check] {name} failed: {record[name]['error']}", file=sys.stderr, flush=True)
        return None
    finally:
        clock.on_step()


# --------------------------------------------------------------------------------------- models and text
def build_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over `w0 w1 ...` (ids below the model's vocabulary), with an <eos> pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = min(vocab_size - 2, 8000)
    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")


def write_text(path: Path, vocab_size: int, docs: int = 240, words: int = 300, seed: int = 0) -> Path:
    """Random words, Zipf-distributed (a few frequent tokens, a long tail, as in text), in blank-line documents."""
    rng = random.Random(seed)
    n = min(vocab_size - 2, 8000)
    weights = [1.0 / (r + 1) for r in range(n)]
    ranks = list(range(n))
    rng.shuffle(ranks)
    paragraphs = [" ".join(f"w{ranks[i]}" for i in rng.choices(range(n), weights, k=words)) for _ in range(docs)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def config_for(shape: str, layers: int | None = None) -> Any:
    from transformers import LlamaConfig

    fields = dict(SHAPES[shape])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return LlamaConfig(**fields)


@torch.no_grad()
def build_model(shape: str, dtype: torch.dtype, device: torch.device, *, layers: int | None = None,
                seed: int = 0) -> Any:
    """A Llama of `shape` with random weights, made on `device` in `dtype` directly (an 8B model is not built
    on the CPU first): normal(0, 0.02) matrices, norm gains near 1, each layer's output projections scaled
    apart (see the module docstring)."""
    from transformers import LlamaForCausalLM

    from prunekit.adapters import get_adapter

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the rotary frequencies stay float32: transformers computes them so
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config_for(shape, layers))
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
        p.copy_(1.0 + 0.1 * noise if p.ndim == 1 else 0.02 * noise)
    ad = get_adapter(model)
    n = ad.num_layers
    scales = [10.0 ** (-1.0 + 2.0 * k / max(2 * n - 1, 1)) for k in range(2 * n)]  # 0.1 .. 10, geometric
    random.Random(seed).shuffle(scales)
    for i, layer in enumerate(ad.layers()):
        for j, part in enumerate(("attn", "mlp")):
            ad.output_projection(layer, part).weight.mul_(scales[2 * i + j])
    return model.eval()


def write_checkpoint(folder: Path, model: Any, tok: Any) -> Path:
    from prunekit.io.checkpoint import save_checkpoint

    save_checkpoint(model, tok, folder)
    return folder


# ------------------------------------------------------------------------------------------ correctness
def plan_facts(plan: Any) -> dict[str, Any]:
    """What must match across devices: the dropped modules and every layer's kept units."""
    return {"dropped": [f"{d.module}@{d.layer}" for d in plan.dropped],
            "widths": {str(k): w.to_json() for k, w in sorted(plan.widths.items())}}


def pipeline(ck: Path, text: Path, device: str, dtype: str, s: dict[str, Any], work: Path, clock: Clock,
             reserve_s: float, rec: dict[str, Any]) -> dict[str, Any]:
    """Every job once on (`device`, `dtype`); each step's result or error, into `rec` as it ends."""
    from prunekit.jobs import bench_job, compress_job, drop_job, eval_job, heal_checkpoint, score_job, width_job

    work.mkdir(parents=True, exist_ok=True)
    calib = dict(calib=str(text), samples=s["samples"], seq_len=s["seq_len"], batch_size=s["batch_size"],
                 dtype=dtype, device=device)
    dev = torch.device(device)

    def score() -> dict[str, Any]:
        with peak_memory(dev) as peak:
            r = score_job(str(ck), **calib, stream=False, use_cache=False, progress=False)
        assert r is not None
        sc = r.scores
        return {"attn": sc.attn, "mlp": sc.mlp, "block": sc.block, "tokens": sc.tokens, **peak}

    def drop() -> dict[str, Any]:
        plan = drop_job(str(ck), work / "drop", target="attn", n=s["drop_n"], **calib, stream=False,
                        use_cache=False, progress=False)
        return plan_facts(plan)

    def width() -> dict[str, Any]:
        res = width_job(str(ck), work / "width", mlp_keep=0.5, heads_keep=0.5, shots=2,
                        multiple_of=s["multiple_of"], **calib, stream=False, use_cache=False, progress=False)
        assert res is not None
        return plan_facts(res[0])

    def compress() -> dict[str, Any]:
        with peak_memory(dev) as peak:
            res = compress_job(str(ck), work / "compress", budget="params=0.8", multiple_of=s["multiple_of"],
                               **calib, stream=False, progress=False)
        assert res is not None
        chosen = next(c for c in res.candidates if c["name"] == res.chosen)
        return {**plan_facts(res.plan), "chosen": res.chosen, "check_ppl": chosen.get("check_ppl"), **peak}

    def heal() -> dict[str, Any]:
        student = work / "drop" if (work / "drop" / "config.json").is_file() else ck
        r = heal_checkpoint(str(student), str(work / "heal"), text=str(text), seq_len=s["heal_seq"],
                            batch_size=s["heal_batch"], steps=HEAL_STEPS, teacher=str(ck), dtype=dtype, device=device,
                            progress=False)
        return {"student": student.name, "loss_first": r["loss_first"], "loss_last": r["loss_last_10pct_mean"]}

    def evaluate() -> dict[str, Any]:
        r = eval_job(str(ck), text=str(text), windows=s["windows"], window_len=s["window_len"], dtype=dtype,
                     device=device, progress=False)
        return {"perplexity": r["perplexity"]}

    def bench() -> dict[str, Any]:
        r = bench_job(str(ck), contexts=s["contexts"], new_tokens=s["new_tokens"], repeats=2, dtype=dtype,
                      device=device, progress=False)
        run = r["runs"][0]
        return {k: run.get(k) for k in ("context", "prefill_tok_s", "decode_tok_s", "kv_bytes", "peak_gpu_bytes")}

    for name, fn in (("score", score), ("drop", drop), ("width", width), ("compress", compress), ("heal", heal),
                     ("eval", evaluate), ("bench", bench)):
        guarded(rec, name, clock, fn, reserve_s)
        release(dev)
    return rec


def _max_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else float("inf")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(ref: dict[str, Any], got: dict[str, Any], bf16: bool) -> dict[str, Any]:
    """`got` (device) against `ref` (CPU float32): same plans; scores, perplexity and heal losses within the
    tolerances (bfloat16: same drop and width plans; its numbers are reported against looser tolerances)."""
    out: dict[str, Any] = {}

    def both(name: str) -> bool:
        ok = bool(ref.get(name, {}).get("ok")) and bool(got.get(name, {}).get("ok"))
        if not ok:
            out[name] = {"pass": False, "why": "a run failed"}
        return ok

    if both("score"):
        diff = max(_max_diff(ref["score"][k], got["score"][k]) for k in ("attn", "mlp", "block"))
        tol = TOL["score_bf16" if bf16 else "score_f32"]
        out["score"] = {"pass": diff <= tol, "max_abs_diff": diff, "tol": tol}
    for name in ("drop", "width", "compress"):
        if both(name):
            same = ref[name]["dropped"] == got[name]["dropped"] and ref[name]["widths"] == got[name]["widths"]
            entry: dict[str, Any] = {"same_plan": same}
            if name == "compress":
                entry["chosen"] = [ref[name]["chosen"], got[name]["chosen"]]
            # bfloat16 must give the same drop and width plans; compress's search compares held-out losses,
            # which bfloat16 moves by more than the gaps between close candidates: reported, not required.
            entry["pass"] = same or (bf16 and name == "compress")
            out[name] = entry
    if both("heal"):
        rel = max(_rel(got["heal"][k], ref["heal"][k]) for k in ("loss_first", "loss_last"))
        tol = TOL["heal_rel_bf16" if bf16 else "heal_rel_f32"]
        out["heal"] = {"pass": rel <= tol, "max_rel_diff": rel, "tol": tol}
    if both("eval"):
        rel = _rel(got["eval"]["perplexity"], ref["eval"]["perplexity"])
        tol = TOL["ppl_rel_bf16" if bf16 else "ppl_rel_f32"]
        out["eval"] = {"pass": rel <= tol, "rel_diff": rel, "tol": tol}
    if both("bench"):
        # KV bytes scale with the element size: float32 must match the CPU exactly, bfloat16 be half of it.
        want = ref["bench"]["kv_bytes"] // (2 if bf16 else 1)
        out["bench"] = {"pass": got["bench"]["kv_bytes"] == want, "kv_bytes": [ref["bench"]["kv_bytes"],
                                                                               got["bench"]["kv_bytes"]]}
    return out


def correctness(size: str, device: str, work: Path, clock: Clock, reserve_s: float,
                rec: dict[str, Any]) -> dict[str, Any]:
    """Fills `rec` (already in the result, so each step is saved as it ends) and returns it."""
    s = RUNS[size]
    runs: dict[str, Any] = {}
    rec.update(shape=SHAPES[size], settings={k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
               runs=runs)
    folder = work / size
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(SHAPES[size]["vocab_size"])
    text = write_text(folder / "text.txt", SHAPES[size]["vocab_size"])
    ck = write_checkpoint(folder / "dense", build_model(size, torch.float32, torch.device("cpu")), tok)
    runs["cpu/float32"] = {}
    pipeline(ck, text, "cpu", "float32", s, folder / "cpu-float32", clock, reserve_s, runs["cpu/float32"])
    for dtype in ("float32", "bfloat16"):
        key = f"{device}/{dtype}"
        if torch.device(device).type == "cpu" and dtype == "float32":
            runs["device/float32"] = runs["cpu/float32"]  # the same run: no need to run it twice
            continue
        runs[f"device/{dtype}"] = {}
        work_dir = folder / ("device-" + key.replace("/", "-").replace(":", ""))
        pipeline(ck, text, device, dtype, s, work_dir, clock, reserve_s, runs[f"device/{dtype}"])
    ref = runs["cpu/float32"]
    rec["compare"] = {"float32": compare(ref, runs["device/float32"], False),
                      "bfloat16": compare(ref, runs["device/bfloat16"], True)}
    rec["pass"] = all(v.get("pass") for c in rec["compare"].values() for v in c.values())
    return rec


# ------------------------------------------------------------------------------------------ scale, speed
def timed_passes(device: torch.device, fn: Callable[[], Any], repeats: int = 2) -> float:
    """The best of `repeats` timed runs after one warm-up (CUDA synchronised around each)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def scale_in_memory(size: str, device: torch.device, dtype: torch.dtype, tok: Any, text: Path,
                    rec: dict[str, Any], clock: Clock, reserve_s: float) -> None:
    """Scoring against a plain forward pass, then bench of the dense and the attention-drop model (`speed`)."""
    from prunekit import calibration_data, get_adapter, llm_drop, score_model
    from prunekit.evaluation.bench import benchmark

    s = RUNS[size]
    state: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        with peak_memory(device) as peak:
            state["model"] = build_model(size, dtype, device)
        state["calib"] = calibration_data(tok, str(text), s["samples"], s["seq_len"])
        params = sum(p.numel() for p in state["model"].parameters())
        return {"params": params, "layers": SHAPES[size]["num_hidden_layers"], **peak}

    def scoring_cost() -> dict[str, Any]:
        model, calib = state["model"], state["calib"]
        ad = get_adapter(model)

        @torch.no_grad()
        def forward() -> None:
            for ids, mask in calib.batches(s["batch_size"]):
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)

        def score() -> None:
            state["scores"] = score_model(model, ad, calib, batch_size=s["batch_size"], pairwise=False,
                                          progress=False)

        with peak_memory(device) as fwd_peak:
            fwd = timed_passes(device, forward)
        with peak_memory(device) as score_peak:
            sc = timed_passes(device, score)
        return {"tokens": int(calib.num_tokens), "forward_s": fwd, "score_s": sc, "score_over_forward": sc / fwd,
                "forward_peak_bytes": fwd_peak["peak_bytes"], "score_peak_bytes": score_peak["peak_bytes"]}

    def speed() -> dict[str, Any]:
        model, calib = state["model"], state["calib"]
        n = min(s["scale_drop"], SHAPES[size]["num_hidden_layers"] // 2)
        kw = dict(contexts=s["contexts"], new_tokens=s["new_tokens"], repeats=3, progress=False)
        dense = benchmark(model, **kw)["runs"][0]
        plan = llm_drop(model, get_adapter(model), calib, target="attn", n=n, batch_size=s["batch_size"],
                        progress=False)
        dropped = benchmark(model, **kw)["runs"][0]
        keys = ("context", "prefill_tok_s", "decode_tok_s", "kv_bytes", "peak_gpu_bytes")
        return {"dropped": [f"{d.module}@{d.layer}" for d in plan.dropped], "n": n,
                "dense": {k: dense.get(k) for k in keys}, "attn_drop": {k: dropped.get(k) for k in keys},
                "prefill_speedup": dropped["prefill_tok_s"] / dense["prefill_tok_s"],
                "decode_speedup": dropped["decode_tok_s"] / dense["decode_tok_s"]}

    try:
        if guarded(rec, "build_in_memory", clock, build, reserve_s) is None:
            return
        guarded(rec, "scoring_cost", clock, scoring_cost, reserve_s)
        guarded(rec, "speed", clock, speed, reserve_s)
    finally:
        state.clear()
        release(device)


def scale_on_disk(size: str, device: torch.device, dtype: torch.dtype, tok: Any, text: Path, folder: Path,
                  layers: int, rec: dict[str, Any], clock: Clock, reserve_s: float) -> None:
    """Layer-streamed scoring's and compress's peak device memory against prunekit's estimates, on a
    checkpoint of `layers` layers of the full shape."""
    from prunekit.adapters import get_adapter
    from prunekit.compress.memory import memory_estimate
    from prunekit.engine.memory import STREAM_HEADROOM, checkpoint_bytes
    from prunekit.io.checkpoint import build_skeleton
    from prunekit.jobs import compress_job, score_job

    s = RUNS[size]
    dtype_name = str(dtype).removeprefix("torch.")
    ck = folder / "checkpoint"
    layers = min(layers, SHAPES[size]["num_hidden_layers"])

    def write() -> dict[str, Any]:
        model = build_model(size, dtype, device, layers=layers)
        write_checkpoint(ck, model, tok)
        del model
        release(device)
        return {"layers": layers, "bytes": checkpoint_bytes(ck, dtype_name)}

    def estimate() -> dict[str, int]:
        return memory_estimate(get_adapter(build_skeleton(ck, dtype_name)), s["samples"], s["seq_len"])

    def streamed_scoring() -> dict[str, Any]:
        est = estimate()
        skeleton = get_adapter(build_skeleton(ck, dtype_name))
        embed = sum(p.numel() * p.element_size() for p in skeleton.embed().parameters())
        states = s["samples"] * s["seq_len"] * skeleton.hidden_size * dtype.itemsize
        with peak_memory(device) as peak:
            r = score_job(str(ck), calib=str(text), samples=s["samples"], seq_len=s["seq_len"],
                          batch_size=s["batch_size"], dtype=dtype_name, device=str(device), stream=True,
                          use_cache=False, progress=False)
        assert r is not None and r.streamed
        near = est["layer"] + est["head"] + embed + 2 * states  # a layer's inputs and outputs, every batch
        return {"layer_bytes": est["layer"], "head_bytes": est["head"], "embed_bytes": embed, "states_bytes": states,
                "expected_bytes": near, "peak_over_expected": _grown(peak) / near,
                "whole_model_bytes": checkpoint_bytes(ck, dtype_name), **peak}

    def compress() -> dict[str, Any]:
        est = estimate()
        weights = checkpoint_bytes(ck, dtype_name) or 0
        # What `jobs.compress.compress_memory` checks against the device's free memory, in memory / streamed.
        common = est["weights"] + est["logits"] + (est["layer_stats"] if device.type != "cpu" else 0)
        with peak_memory(device) as peak:
            res = compress_job(str(ck), folder / "compressed", budget="params=0.8", calib=str(text),
                               samples=s["samples"], seq_len=s["seq_len"], batch_size=s["batch_size"],
                               multiple_of=s["multiple_of"], dtype=dtype_name, device=str(device), progress=False)
        assert res is not None
        resident = int(weights * STREAM_HEADROOM) + common
        return {"chosen": res.chosen, "dropped": [f"{d.module}@{d.layer}" for d in res.plan.dropped],
                "narrowed_layers": len(res.plan.widths), "estimate_in_memory_bytes": resident,
                "estimate_streamed_bytes": est["layer"] + est["head"] + common,
                "peak_over_estimate_in_memory": _grown(peak) / max(resident, 1),
                "estimate": est, **peak}

    if guarded(rec, "write_checkpoint", clock, write, reserve_s) is None:
        return
    guarded(rec, "streamed_scoring", clock, streamed_scoring, reserve_s)
    release(device)
    guarded(rec, "compress", clock, compress, reserve_s)
    release(device)


def scale(size: str, device: str, layers: int, work: Path, clock: Clock, reserve_s: float,
          rec: dict[str, Any]) -> dict[str, Any]:
    """Fills `rec` (already in the result, so each step is saved as it ends) and returns it."""
    dev = torch.device(device)
    # bfloat16 as users run 8B models on a GPU; on the CPU float32 (its bfloat16 kernels are slow).
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    folder = work / f"scale-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(SHAPES[size]["vocab_size"])
    text = write_text(folder / "text.txt", SHAPES[size]["vocab_size"])
    rec.update(size=size, dtype=str(dtype).removeprefix("torch."), shape=SHAPES[size])
    scale_in_memory(size, dev, dtype, tok, text, rec, clock, reserve_s)
    scale_on_disk(size, dev, dtype, tok, text, folder, layers, rec, clock, reserve_s)
    return rec


# ------------------------------------------------------------------------------------------------ report
def table(result: dict[str, Any]) -> str:
    rows = [("section", "item", "status", "numbers")]
    for size, c in result.get("correctness", {}).items():
        if "error" in c:
            rows.append(("correctness", size, "FAILED", c["error"][:80]))
        for dtype, comp in c.get("compare", {}).items():
            for step, v in comp.items():
                nums = ", ".join(f"{k}={v[k]:.3g}" if isinstance(v[k], float) else f"{k}={v[k]}"
                                 for k in v if k not in ("pass", "why", "tol"))
                rows.append((f"correct {size}", f"{dtype} {step}", "ok" if v.get("pass") else "DIFF", nums[:90]))
    sc = result.get("scale", {})
    for item in ("build_in_memory", "scoring_cost", "speed", "write_checkpoint", "streamed_scoring", "compress"):
        v = sc.get(item)
        if v is None:
            continue
        if not v.get("ok"):
            rows.append(("scale", item, "FAILED", v.get("error", "")[:90]))
            continue
        if item == "scoring_cost":
            nums = f"score/forward={v['score_over_forward']:.2f} ({v['score_s']:.2f}s/{v['forward_s']:.2f}s)"
        elif item == "speed":
            nums = (f"prefill {v['dense']['prefill_tok_s']:.0f}->{v['attn_drop']['prefill_tok_s']:.0f} tok/s, "
                    f"decode {v['dense']['decode_tok_s']:.1f}->{v['attn_drop']['decode_tok_s']:.1f} tok/s")
        elif item == "streamed_scoring":
            nums = f"peak {v['peak_bytes'] / 2**30:.2f} GiB, peak/expected {v['peak_over_expected']:.2f}"
        elif item == "compress":
            nums = (f"{v['seconds']:.0f}s, peak {v['peak_bytes'] / 2**30:.2f} GiB, "
                    f"peak/estimate {v['peak_over_estimate_in_memory']:.2f}")
        else:
            nums = f"{v['seconds']:.1f}s"
        rows.append(("scale", item, "ok", nums))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="the device to check against the CPU (default cuda)")
    p.add_argument("--sizes", default="tiny,smollm2,llama8b",
                   help="comma-separated: tiny, smollm2, llama8b (default all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="stop starting steps after this many seconds; the JSON is written anyway (default 420)")
    p.add_argument("--scale-layers", type=int, default=4,
                   help="layers of the on-disk checkpoint for streamed scoring and compress (default 4)")
    args = p.parse_args(argv)
    sizes = [x.strip() for x in args.sizes.split(",") if x.strip()]
    unknown = [x for x in sizes if x not in SHAPES]
    if unknown or not sizes:
        p.error(f"unknown size(s) {unknown}; choose from {', '.join(SHAPES)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"meta": {"argv": sys.argv[1:] if argv is None else argv, "device": args.device,
                                       "sizes": sizes, "budget_s": args.budget_s, "tolerances": TOL,
                                       "heal_steps": HEAL_STEPS}}
    clock = Clock(args.budget_s)
    clock.on_step = lambda: _write(out, result, clock)
    result["meta"]["versions"] = versions()
    result["meta"]["versions"]["matplotlib"] = stub_matplotlib()
    print(json.dumps(result["meta"]["versions"]), flush=True)
    from prunekit.jobs.dist import check_device

    check_device(args.device)  # one clear error before any work
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on the GPU too (torch's default)
    scale_size = "llama8b" if "llama8b" in sizes else sizes[-1]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        os.environ["PRUNEKIT_CACHE"] = str(work / "cache")  # no user cache read or written
        result["correctness"] = {}
        # tiny first (does CUDA work at all), then the scale and speed sections, then the SmolLM2 shape, whose
        # CPU reference runs are the slowest part of the check.
        order = [x for x in sizes if x == "tiny"] + ["@scale"] + [x for x in sizes if x not in ("tiny", "llama8b")]
        for size in order:
            try:  # no alarm around the whole: each step inside has its own
                if size == "@scale":
                    result["scale"] = {}
                    scale(scale_size, args.device, args.scale_layers, work, clock, 0.0, result["scale"])
                else:
                    result["correctness"][size] = {}
                    correctness(size, args.device, work, clock, 0.0, result["correctness"][size])
            except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
                where = result["scale"] if size == "@scale" else result["correctness"][size]
                where.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
            _write(out, result, clock)
    _write(out, result, clock)
    print(table(result))
    print(f"[gpu_check] wrote {out}", file=sys.stderr)
    return 0


def _write(out: Path, result: dict[str, Any], clock: Clock) -> None:
    result["meta"]["wall_s"] = round(time.monotonic() - clock.start, 1)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
