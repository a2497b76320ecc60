"""Layer streaming vs in memory: peak RSS and wall time of `prunekit score`, `prunekit drop` and `prunekit width`
on a synthetic random-weight Llama checkpoint of more than 6 GB.

The checkpoint (fp32, hidden 4096, intermediate 11008, 32 heads / 8 KV heads, vocab 49152 = the built-in
SmolLM2 tokenizer's, tied embeddings, `--layers` layers: 8 give 6.5 GB) is written one layer per shard,
generating each layer's tensors just before saving them, so this script never holds the model either. The
tokenizer is copied from the built-in SmolLM2 (`$PRUNEKIT_CACHE/models/smollm2-135m`; run `prunekit demo`
or any command on smollm2-135m once to convert it).

Every measured command runs in its own process (`python -m prunekit ...`); its peak RSS is the kernel's
maximum resident set size reported by `/usr/bin/time`, its time the wall time of the whole command (imports, loading,
calibration, saving). The checkpoint is read once before the runs so that all of them start from a warm page
cache (page-cache pages are not part of RSS; memory-mapped weights are, while they are mapped). Calibration is
small (`--samples` x `--seq-len` tokens of the built-in c4 text) so the run takes minutes on 2 cores.

    .venv/bin/python benchmarks/bench_stream.py [--layers 8] [--samples 4] [--seq-len 128] [--keep]

Prints a table and writes benchmarks/results/stream.json. The synthetic checkpoint lives under --dir (default
a new directory under /tmp) and is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=8)


def tokenizer_dir() -> Path:
    from prunekit.io.assets import cache_dir

    path = cache_dir() / "models" / "smollm2-135m"
    if not (path / "tokenizer.json").is_file():
        sys.exit(f"{path} has no tokenizer; run any prunekit command on smollm2-135m once to convert it")
    return path


def write_checkpoint(out: Path, layers: int, seed: int = 0) -> int:
    """Synthetic Llama, one shard per layer (plus one for the embedding and final norm); returns bytes."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    tok_dir = tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab = len(tok)
    cfg = LlamaConfig(**SHAPE, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      dtype="float32")
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    h, f = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    hd = h // SHAPE["num_attention_heads"]
    kv = SHAPE["num_key_value_heads"] * hd
    n_shards = layers + 1
    weight_map: dict[str, str] = {}
    total = 0

    def randn(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm() -> torch.Tensor:
        return 1.0 + randn(h, std=0.05)

    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        if s == 0:
            tensors = {"model.embed_tokens.weight": randn(vocab, h), "model.norm.weight": norm()}
        else:
            p = f"model.layers.{s - 1}."
            tensors = {
                p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                p + "self_attn.q_proj.weight": randn(h, h), p + "self_attn.k_proj.weight": randn(kv, h),
                p + "self_attn.v_proj.weight": randn(kv, h), p + "self_attn.o_proj.weight": randn(h, h),
                p + "mlp.gate_proj.weight": randn(f, h), p + "mlp.up_proj.weight": randn(f, h),
                p + "mlp.down_proj.weight": randn(h, f),
            }
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del tensors
        print(f"  wrote {name}", flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    return total


def warm_page_cache(path: Path) -> None:
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def run(args: list[str], env: dict[str, str], work: Path) -> dict[str, Any]:
    """One `python -m prunekit ...` in a child process: wall seconds and peak RSS.

    The child is started by `/usr/bin/time`, a small process: Linux carries a parent's high-water RSS over
    fork and exec into the child's `ru_maxrss`, so forking from this (large) Python process would report our
    own peak instead of the command's."""
    cmd = [sys.executable, "-m", "prunekit", "-q", *args]
    stats = work / "time.out"
    timed = ["/usr/bin/time", "-f", "%M %e", "-o", str(stats), *cmd]
    t0 = time.perf_counter()
    res = subprocess.run(timed, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"command failed ({res.returncode}): {' '.join(cmd)}\n"
                         f"{res.stdout.decode(errors='replace')[-4000:]}")
    max_kb = int(stats.read_text().split()[-2])
    return {"seconds": round(wall, 2), "peak_rss_bytes": max_kb * 1024, "command": "prunekit " + " ".join(args)}


def same_checkpoints(a: Path, b: Path) -> bool:
    """Tensor-for-tensor equality of two checkpoints, one tensor at a time (memory-mapped)."""
    from safetensors import safe_open

    def index(p: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in p.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as st:
                out.update({k: f for k in st.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False
    for name in ia:
        with safe_open(str(ia[name]), framework="pt") as sa, safe_open(str(ib[name]), framework="pt") as sb:
            if not torch.equal(sa.get_tensor(name), sb.get_tensor(name)):
                return False
    return json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (8 give 6.5 GB in fp32)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--drop-n", type=int, default=2, help="blocks to drop in the drop runs")
    ap.add_argument("--width", default="--mlp-keep 0.75 --heads-keep 0.75 --shots 2",
                    help="options of the width runs (default: keep 3/4 of the MLP channels and KV groups, 2 shots)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs of every command, alternating between commands; the fastest time and the "
                         "largest peak RSS are reported (other processes on a small machine add noise)")
    ap.add_argument("--dir", default=None, help="work directory (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and outputs")
    ap.add_argument("--json", default=str(HERE / "results" / "stream.json"))
    a = ap.parse_args()

    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="prunekit-bench-stream-", dir="/tmp"))
    ckpt = work / "synthetic-llama"
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    try:
        t0 = time.perf_counter()
        print(f"writing a synthetic checkpoint with {a.layers} layers to {ckpt}")
        size = write_checkpoint(ckpt, a.layers)
        write_s = time.perf_counter() - t0
        print(f"  {size / 1e9:.2f} GB of tensors in {write_s:.0f} s")
        # The tokenizer lives in the real cache; the score cache and streamed work dirs in a scratch one, which
        # the built-in model conversion never needs (the synthetic checkpoint is a local directory).
        env["PRUNEKIT_CACHE"] = str(work / "cache")
        calib = ["--calib", "c4", "--samples", str(a.samples), "--seq-len", str(a.seq_len),
                 "--batch-size", str(a.batch_size)]
        drop = ["--target", "block", "--n", str(a.drop_n), "--force"]
        width = [*a.width.split(), "--force"]
        runs: dict[str, dict[str, Any]] = {}
        plan = [
            ("score, in memory", ["score", str(ckpt), *calib, "--no-stream", "--no-cache", "--force", "--json",
                                  str(work / "score-mem.json")]),
            ("score, streamed (states in RAM)", ["score", str(ckpt), *calib, "--stream", "--no-cache", "--force", "--json",
                                                 str(work / "score-stream.json")]),
            ("score, streamed (states on disk, resumable)", ["score", str(ckpt), *calib, "--stream", "--force", "--json",
                                                             str(work / "score-stream-disk.json")]),
            ("score, streamed, cache hit", ["score", str(ckpt), *calib, "--stream", "--force", "--json",
                                            str(work / "score-cached.json")]),
            ("drop, in memory", ["drop", str(ckpt), *calib, *drop, "--no-stream", "--no-cache", "--out",
                                 str(work / "drop-mem")]),
            ("drop, streamed", ["drop", str(ckpt), *calib, *drop, "--stream", "--no-cache", "--out",
                                str(work / "drop-stream")]),
            ("width, in memory", ["width", str(ckpt), *calib, *width, "--no-stream", "--no-cache", "--out",
                                  str(work / "width-mem")]),
            ("width, streamed", ["width", str(ckpt), *calib, *width, "--stream", "--no-cache", "--out",
                                 str(work / "width-stream")]),
        ]
        for rep in range(a.repeats):
            for label, args in plan:
                if rep and "cache hit" in label:
                    continue
                if "cache hit" not in label and "(states on disk" in label:
                    shutil.rmtree(work / "cache", ignore_errors=True)  # a miss again, then the hit below
                warm_page_cache(ckpt)
                print(f"running: {label} ({rep + 1}/{a.repeats})", flush=True)
                r = run(args, env, work)
                print(f"  {r['seconds']:.1f} s, peak RSS {gib(r['peak_rss_bytes'])} GiB", flush=True)
                if label in runs:
                    r["all_seconds"] = runs[label]["all_seconds"] + [r["seconds"]]
                    r["seconds"] = min(r["seconds"], runs[label]["seconds"])
                    r["peak_rss_bytes"] = max(r["peak_rss_bytes"], runs[label]["peak_rss_bytes"])
                else:
                    r["all_seconds"] = [r["seconds"]]
                runs[label] = r

        def scores(name: str) -> dict[str, Any]:
            return json.loads((work / name).read_text())

        ref = scores("score-mem.json")
        max_diff = 0.0
        for name in ("score-stream.json", "score-stream-disk.json", "score-cached.json"):
            got = scores(name)
            for r, g in zip(ref["layers"], got["layers"], strict=True):
                max_diff = max(max_diff, *(abs(r[k] - g[k]) for k in ("block", "attn", "mlp")))
        drop_equal = same_checkpoints(work / "drop-mem", work / "drop-stream")
        width_equal = same_checkpoints(work / "width-mem", work / "width-stream")

        mem_s, str_s = runs["score, in memory"], runs["score, streamed (states in RAM)"]
        mem_d, str_d = runs["drop, in memory"], runs["drop, streamed"]
        mem_w, str_w = runs["width, in memory"], runs["width, streamed"]
        summary = {
            "checkpoint_bytes": size,
            "score_streamed_rss_fraction_of_checkpoint": round(str_s["peak_rss_bytes"] / size, 4),
            "score_streamed_time_ratio_vs_in_memory": round(str_s["seconds"] / mem_s["seconds"], 3),
            "drop_streamed_rss_fraction_of_checkpoint": round(str_d["peak_rss_bytes"] / size, 4),
            "drop_streamed_time_ratio_vs_in_memory": round(str_d["seconds"] / mem_d["seconds"], 3),
            "max_abs_score_diff_streamed_vs_in_memory": max_diff,
            "drop_checkpoints_equal": drop_equal,
            "width_streamed_rss_fraction_of_checkpoint": round(str_w["peak_rss_bytes"] / size, 4),
            "width_streamed_time_ratio_vs_in_memory": round(str_w["seconds"] / mem_w["seconds"], 3),
            "width_checkpoints_equal": width_equal,
            "targets": {"score_rss_fraction_below": 0.30, "score_time_ratio_below": 1.5},
        }
        result = {
            "benchmark": "layer streaming vs in memory",
            "model": {"family": "llama (synthetic random weights, fp32)", **SHAPE, "num_hidden_layers": a.layers,
                      "vocab_size": 49152, "tie_word_embeddings": True},
            "calibration": {"source": "c4", "samples": a.samples, "seq_len": a.seq_len,
                            "batch_size": a.batch_size},
            "repeats": a.repeats,
            "load_average_at_end": os.getloadavg(),
            "drop": {"target": "block", "n": a.drop_n},
            "width": a.width,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                        "python": platform.python_version()},
            "checkpoint_write_seconds": round(write_s, 1),
            "runs": runs,
            "summary": summary,
        }
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")

        print()
        print(f"checkpoint: {size / 1e9:.2f} GB ({gib(size)} GiB) fp32, {a.layers} layers; calibration "
              f"{a.samples} x {a.seq_len} tokens")
        print(f"{'run':46} {'wall s':>8} {'peak RSS GiB':>13} {'RSS / ckpt':>11}")
        for label, r in runs.items():
            print(f"{label:46} {r['seconds']:8.1f} {gib(r['peak_rss_bytes']):>13} "
                  f"{r['peak_rss_bytes'] / size:11.1%}")
        print(f"streamed score: RSS {summary['score_streamed_rss_fraction_of_checkpoint']:.1%} of the checkpoint "
              f"(target < 30%), time x{summary['score_streamed_time_ratio_vs_in_memory']:.2f} of in memory "
              f"(target < 1.5)")
        print(f"max |score diff| streamed vs in memory: {max_diff:.3g}; drop checkpoints equal: {drop_equal}; "
              f"width checkpoints equal: {width_equal}")
        print(f"JSON written to {a.json}")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
