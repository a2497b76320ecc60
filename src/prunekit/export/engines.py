"""Running an exported GGUF in llama.cpp from Python, for verification and benchmarks.

Two bindings:
- `xllamacpp` (prebuilt wheel, llama-server's API): greedy generation with top-k log-probabilities. Its
  completion API returns log-probabilities of *generated* tokens only (no prompt/echo log-probs, llama.cpp
  issue #27174). Forcing each next token with `logit_bias` does read its raw log-probability (tried: equal to
  transformers' to 1e-4 on a tiny model), but the server withholds log-probs of a token that ends inside a
  multi-byte UTF-8 character, which real text has, so perplexity is left to llama-cpp-python.
- `llama-cpp-python` (built from source, `make llamacpp`): `logits_all=True` gives the logits of every prompt
  position in one pass (`llamacpp_nll`), and `llama_model_quantize`, which quantized exports need.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any, Iterator, Sequence

import numpy as np

from prunekit.export.common import ExportError


def have_xllamacpp() -> bool:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return False
    return True


def have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Completion:
    text: str
    # Generated token ids. The server reports ids only beside log-probabilities (n_probs > 0), and withholds
    # those for a token that ends inside a multi-byte UTF-8 character: compare `text` when that matters.
    tokens: list[int]
    # Per generated token: {token id: log-probability} of the top candidates (llama.cpp's softmax).
    top_logprobs: list[dict[int, float]]
    prompt_ms: float
    predicted_ms: float
    prompt_n: int
    predicted_n: int


class XServer:
    """One llama.cpp server in-process (xllamacpp); greedy; no prompt cache reuse unless asked."""

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, threads: int | None = None, n_batch: int = 2048):
        import xllamacpp as xlc

        p = xlc.CommonParams()
        p.model.path = str(path)
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = min(n_batch, 512)
        p.n_parallel = 1
        n = threads or max(1, min(os.cpu_count() or 1, 4))
        p.cpuparams.n_threads = n
        p.cpuparams_batch.n_threads = n
        p.warmup = False
        try:
            self._server = xlc.Server(p)
        except RuntimeError as e:
            raise ExportError(f"llama.cpp (xllamacpp) could not load {path}: {e}") from e

    def complete(self, prompt: Sequence[int] | str, n_predict: int, *, n_probs: int = 0,
                 cache_prompt: bool = False) -> Completion:
        """Greedy completion. `cache_prompt=True` reuses the KV cache of the previous call's common prefix (the
        same prompt again: only its last token is evaluated, then decoding starts at the same positions)."""
        req: dict[str, Any] = {"prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
                               "n_predict": n_predict, "temperature": 0.0, "top_k": 1, "cache_prompt": cache_prompt,
                               "n_probs": n_probs, "ignore_eos": True, "return_tokens": True}
        r = self._server.handle_completions(req)
        if "error" in r:
            raise ExportError(f"llama.cpp completion failed: {r['error']}")
        choice = r["choices"][0] if "choices" in r else r
        content = ((choice.get("logprobs") or {}).get("content")) or []
        tokens = [int(c["id"]) for c in content] if content else [int(t) for t in r.get("tokens", [])]
        tops = [{int(t["id"]): float(t["logprob"]) for t in c.get("top_logprobs", [])} for c in content]
        timings = r.get("timings", {})
        return Completion(str(choice.get("text", choice.get("content", ""))), tokens, tops, float(timings.get("prompt_ms", math.nan)),
                          float(timings.get("predicted_ms", math.nan)), int(timings.get("prompt_n", 0)),
                          int(timings.get("predicted_n", 0)))

    def close(self) -> None:
        del self._server


@contextmanager
def xserver(path: str | Path, **kw: Any) -> Iterator[XServer]:
    s = XServer(path, **kw)
    try:
        yield s
    finally:
        s.close()


def llamacpp_nll(path: str | Path, windows: Sequence[Sequence[int]], *, threads: int | None = None) -> float:
    """Mean negative log-likelihood (nats/token) of each window's tokens 1..n given the ones before, from
    llama.cpp's full logits (llama-cpp-python, `logits_all=True`)."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ExportError("perplexity in llama.cpp needs llama-cpp-python (`make llamacpp`)") from e
    n_ctx = max(len(w) for w in windows)
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True, verbose=False,
                n_threads=threads or max(1, min(os.cpu_count() or 1, 4)))
    total, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(list(int(t) for t in w))
        tgt = np.asarray(w[1:], dtype=np.int64)
        # In blocks of rows: a float64 copy of every position's logits is 2 GB at Gemma's 262k vocabulary.
        for start in range(0, len(tgt), 64):
            logits = np.asarray(llm.scores[start:min(start + 64, len(tgt))], dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            logz = np.log(np.exp(logits).sum(axis=1))
            rows = np.arange(len(logits))
            total += float((logz - logits[rows, tgt[start:start + len(logits)]]).sum())
        count += len(tgt)
    del llm
    return total / count


def _proc_status_bytes() -> dict[str, int]:
    """Linux /proc/self/status memory lines (VmRSS, VmHWM, RssAnon, RssFile) in bytes."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _serve_once(path: str, prompt: list[int], n_predict: int, n_ctx: int, threads: int, queue: Any) -> None:
    before = _proc_status_bytes()
    s = XServer(path, n_ctx=n_ctx, threads=threads)
    s.complete(prompt, n_predict)
    after = _proc_status_bytes()
    s.close()
    queue.put({"baseline_rss_bytes": before["VmRSS"], "peak_rss_bytes": after["VmHWM"],
               "rss_anon_bytes": after.get("RssAnon", 0), "rss_file_bytes": after.get("RssFile", 0)})


def serving_memory(path: str | Path, prompt: Sequence[int], n_predict: int, *, n_ctx: int,
                   threads: int = 2) -> dict[str, int]:
    """Peak resident memory of a fresh process that loads `path` in llama.cpp (xllamacpp) and completes
    `prompt` once: the process's own peak, so nothing else measured before it counts. Weights are mmapped, so
    they appear as file-backed resident pages (`rss_file_bytes`); the KV cache and compute buffers as
    anonymous ones (`rss_anon_bytes`). Linux only (/proc)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a clean interpreter: no memory inherited from the caller
    queue = ctx.Queue()
    p = ctx.Process(target=_serve_once, args=(str(path), [int(t) for t in prompt], n_predict, n_ctx, threads, queue))
    p.start()
    while True:  # a child that dies (llama.cpp abort) never answers: poll instead of blocking forever
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not p.is_alive():
                raise ExportError(f"measuring memory of {path} failed (exit code {p.exitcode})") from None
    p.join()
    return result


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0
