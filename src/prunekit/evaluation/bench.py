"""Speed and memory measurements for a causal LM: prefill and decode throughput, KV-cache size, peak memory.

What is measured (per context length ``c``, ``batch`` sequences of deterministic random token ids):

* **prefill**: one forward over the ``c`` tokens with ``use_cache=True`` into a fresh
  ``transformers.DynamicCache(config=model.config)`` (and ``logits_to_keep=1`` when the model supports it,
  as ``generate`` does). ``prefill_tok_s = batch * c / median time``.
* **decode**: from that prefilled cache, ``new_tokens`` greedy steps, each one forward call on a single token
  per sequence (the first input is the argmax of the prefill logits). ``decode_tok_s = batch * new_tokens /
  median time``. The cache then holds ``c + new_tokens`` positions.
* **kv_bytes**: the bytes of every key/value tensor the cache holds right after prefill (the tensors' own
  sizes). :func:`analytic_kv_bytes` predicts this exactly from the config.
* **kv_storage_bytes**: the bytes of the distinct storages behind those tensors. For sliding-window layers
  transformers keeps a *view* of the last ``window - 1`` positions of the full prefill tensor, so right after
  prefill the whole context's storage is still alive; it is released at the first decode step.
* **peak_rss_bytes**: the process's peak resident set size so far (``getrusage``; it never goes down, so it
  is the peak over everything the process did up to the end of that context's runs); on CUDA also
  ``peak_gpu_bytes`` = ``torch.cuda.max_memory_allocated`` during that context's runs.

Times are medians over ``repeats`` runs after ``warmup`` discarded runs; every run starts from a fresh cache.
"""

from __future__ import annotations

import inspect
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from prunekit.errors import OptionError

__all__ = ["analytic_kv_bytes", "benchmark", "format_table", "measured_kv_bytes", "peak_rss_bytes"]

# How each transformers cache layer type (DYNAMIC_LAYER_TYPE_MAPPING in transformers.cache_utils) holds K/V.
_FULL_TYPES = frozenset({"full_attention", "hybrid", "indexed_attention"})
_WINDOW_TYPES = frozenset({"sliding_attention", "chunked_attention", "hybrid_sliding"})
_NO_KV_TYPES = frozenset({"dummy", "moe", "mlp", "conv", "linear_attention"})


# ------------------------------------------------------------------------------------------ KV sizes
def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def _layer_configs(config: Any, n_layers: int) -> list[Any]:
    """Per-layer configs (heterogeneous configs override some attributes per layer)."""
    view = getattr(config, "per_layer_config", None)
    if view is None:
        return [config] * n_layers
    return [view[i] for i in range(n_layers)]


def _layer_types(config: Any, layer_cfgs: Sequence[Any]) -> list[str]:
    """Cache layer types exactly as ``transformers.cache_utils.get_layer_types_and_kwargs`` derives them."""
    types = getattr(config, "layer_types", None)
    if types is None:
        types = []
        for lc in layer_cfgs:
            if getattr(lc, "sliding_window", None) is not None:
                types.append("sliding_attention")
            elif getattr(lc, "attention_chunk_size", None) is not None:
                types.append("chunked_attention")
            else:
                types.append("full_attention")
    types = list(types)
    sharing = getattr(config, "kv_sharing_modes", None)
    if sharing is not None:  # layers that reuse another layer's KV store nothing
        types = ["dummy" if mode == "reuse" else t for t, mode in zip(types, sharing)]
    return types


def _window_tokens(context: int, window: int) -> int:
    """Positions a ``DynamicSlidingWindowLayer`` keeps after one update with ``context`` tokens.

    transformers 5.23 stores ``full[:, :, -window + 1:, :]``: the last ``window - 1`` positions (the
    query at the next step completes the window). For ``window == 1`` that slice is ``[0:]``, i.e. all.
    """
    if window <= 1:
        return context
    return min(context, window - 1)


def analytic_kv_bytes(
    config: Any,
    context: int,
    batch: int,
    dtype_bytes: int,
    attn_layers: list[int] | None = None,
) -> int:
    """Bytes of K and V a ``DynamicCache(config=config)`` holds after a prefill of ``context`` tokens.

    ``2 * batch * dtype_bytes * sum over attention layers of (kept_tokens * num_key_value_heads * head_dim)``
    with ``head_dim = config.head_dim or hidden_size // num_attention_heads`` and ``kept_tokens = context``
    for full attention, ``min(context, window - 1)`` for sliding/chunked layers (what transformers 5.23's
    ``DynamicSlidingWindowLayer`` keeps), 0 for layers without KV (``mlp``/``moe``/shared-KV/linear-attention).

    Args:
        config: the model config (multimodal configs: the text decoder config is used).
        context: prefilled tokens per sequence.
        batch: sequences.
        dtype_bytes: bytes per K/V element (e.g. 2 for bf16).
        attn_layers: indices of the layers that still have attention (default: all layers); layers not listed
            count 0, e.g. after their attention block was dropped.
    """
    cfg = _text_config(config)
    n_layers = int(cfg.num_hidden_layers)
    layer_cfgs = _layer_configs(cfg, n_layers)
    types = _layer_types(cfg, layer_cfgs)
    keep = set(range(n_layers)) if attn_layers is None else set(attn_layers)
    per_token = 0  # sum over layers of kept_tokens * kv_heads * head_dim
    for i, (lc, kind) in enumerate(zip(layer_cfgs, types)):
        if i not in keep or kind in _NO_KV_TYPES:
            continue
        n_heads = int(lc.num_attention_heads)
        kv_heads = getattr(lc, "num_key_value_heads", None) or n_heads
        head_dim = getattr(lc, "head_dim", None) or lc.hidden_size // n_heads
        if kind in _FULL_TYPES:
            tokens = context
        elif kind in _WINDOW_TYPES:
            window = lc.attention_chunk_size if kind == "chunked_attention" else lc.sliding_window
            tokens = _window_tokens(context, int(window))
        else:
            raise ValueError(f"layer {i}: cache layer type {kind!r} is not supported by analytic_kv_bytes")
        per_token += tokens * int(kv_heads) * int(head_dim)
    return 2 * batch * per_token * dtype_bytes


def _kv_tensors(cache: Any) -> list[torch.Tensor]:
    """Every key/value tensor held by a transformers ``Cache`` (skips ``None``, e.g. ``DummyLayer``)."""
    tensors: list[torch.Tensor] = []
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                tensors.append(t)
    return tensors


def measured_kv_bytes(cache: Any) -> tuple[int, int]:
    """``(tensor_bytes, storage_bytes)`` of a cache's K/V: sum of ``.nbytes`` of the tensors, and of the
    distinct underlying storages (larger when tensors are views into bigger buffers)."""
    tensors = _kv_tensors(cache)
    tensor_bytes = sum(t.nbytes for t in tensors)
    storages: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return tensor_bytes, sum(storages.values())


# ---------------------------------------------------------------------------------------------- memory
def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process in bytes (None where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 50 ms by a thread. Unlike
    `peak_rss_bytes` (the whole life of the process), it measures one block: one row of a benchmark."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------- timing
def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _n_params(model: torch.nn.Module) -> int:
    # model.parameters() yields tied weights once.
    return sum(p.numel() for p in model.parameters())


def _one_run(
    model: Any,
    input_ids: torch.Tensor,
    new_tokens: int,
    cache_cls: Any,
    extra: dict[str, Any],
    sync: Callable[[], None],
) -> dict[str, Any]:
    """One prefill + greedy decode from a fresh cache; returns times, KV sizes and decode bookkeeping."""
    cache = cache_cls(config=model.config)
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, **extra)
    sync()
    prefill_s = time.perf_counter() - t0
    kv_bytes, kv_storage = measured_kv_bytes(cache)

    next_ids = out.logits[:, -1:].argmax(dim=-1)  # (batch, 1)
    del out
    steps = 0
    sync()
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
        next_ids = out.logits[:, -1:].argmax(dim=-1)
        steps += 1
    sync()
    decode_s = time.perf_counter() - t0
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "kv_bytes": kv_bytes,
        "kv_storage_bytes": kv_storage,
        "decode_steps": steps,
        "seq_len_after_decode": int(cache.get_seq_length()),
    }


def check_positions(config: Any, contexts: Sequence[int], new_tokens: int) -> None:
    """One clear error, before any run, when a context plus its decoded tokens exceeds the positions the model
    was built for (the run would take minutes and measure a model outside what it can do)."""
    limit = getattr(_text_config(config), "max_position_embeddings", None)
    longest = max(contexts, default=0) + new_tokens
    if isinstance(limit, int) and longest > limit:
        raise OptionError(f"--context {max(contexts)} plus --new-tokens {new_tokens} is {longest} positions, but "
                          f"the model has {limit}; use a --context of at most {limit - new_tokens}")


def benchmark(
    model: Any,
    *,
    contexts: Iterable[int] = (128, 512, 1024),
    new_tokens: int = 32,
    batch: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    device: str | torch.device | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure prefill/decode throughput, KV-cache bytes and peak memory of a HF causal LM.

    Args:
        model: a ``transformers`` causal LM. It is put in eval mode.
        contexts: prompt lengths to measure (tokens per sequence).
        new_tokens: greedy decode steps after each prefill.
        batch: sequences per forward.
        repeats: timed runs per context (medians are reported).
        warmup: untimed runs per context before the timed ones.
        device: where to run; the model is moved there if given. Default: the model's own device.
        vocab_size: token ids are drawn from ``[0, vocab_size)``; default the config's vocab size.
        seed: seed of the ``torch.Generator`` that draws the input ids (one draw per context).
        progress: print one line per context to stderr.

    Returns:
        ``{"params", "disk_bytes": None (for the caller to fill), "device", "dtype", "batch", "new_tokens",
        "repeats", "warmup", "seed", "runs": [{"context", "prefill_tok_s", "decode_tok_s", "prefill_s",
        "decode_s", "prefill_s_all", "decode_s_all", "kv_bytes", "kv_storage_bytes", "decode_steps",
        "seq_len_after_decode", "peak_rss_bytes"[, "peak_gpu_bytes"]}, ...]}``.
    """
    if repeats < 1 or warmup < 0 or new_tokens < 0 or batch < 1:
        raise ValueError("need repeats >= 1, warmup >= 0, new_tokens >= 0, batch >= 1")
    contexts = [int(c) for c in contexts]
    if any(c < 1 for c in contexts):
        raise ValueError(f"contexts must be >= 1, got {contexts}")
    check_positions(model.config, contexts, new_tokens)

    if device is not None:
        model.to(device)
    model.eval()
    dev = _model_device(model)
    sync = _synchronizer(dev)
    vocab = int(vocab_size or _text_config(model.config).vocab_size)
    # Prefill only needs the last position's logits, as in `generate`; older models lack the argument.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    result: dict[str, Any] = {
        "params": _n_params(model),
        "disk_bytes": None,
        "device": str(dev),
        "dtype": str(_model_dtype(model)).removeprefix("torch."),
        "batch": batch,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "runs": [],
    }
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for context in contexts:
        input_ids = torch.randint(0, vocab, (batch, context), generator=gen).to(dev)
        entry = _measure_context(model, input_ids, new_tokens, warmup, repeats, extra, sync)
        result["runs"].append(entry)
        if progress:
            decode = f"{entry['decode_tok_s']:.1f}" if entry["decode_tok_s"] is not None else "-"
            print(
                f"[bench] context {context}: prefill {entry['prefill_tok_s']:.1f} tok/s, "
                f"decode {decode} tok/s, KV {entry['kv_bytes'] / 2**20:.2f} MiB",
                file=sys.stderr,
                flush=True,
            )
    return result


def _measure_context(model: Any, input_ids: torch.Tensor, new_tokens: int, warmup: int, repeats: int,
                     extra: dict[str, Any], sync: Callable[[], None]) -> dict[str, Any]:
    """One context length: `warmup` untimed and `repeats` timed prefill + decode runs; medians reported."""
    batch, context = input_ids.shape
    dev = input_ids.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    timed: list[dict[str, Any]] = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            run = _one_run(model, input_ids, new_tokens, DynamicCache, extra, sync)
            if i >= warmup:
                timed.append(run)
    prefill_s = statistics.median(r["prefill_s"] for r in timed)
    decode_s = statistics.median(r["decode_s"] for r in timed)
    last = timed[-1]
    entry: dict[str, Any] = {
        "context": context,
        "prefill_tok_s": batch * context / prefill_s if prefill_s > 0 else float("inf"),
        "decode_tok_s": (batch * new_tokens / decode_s if decode_s > 0 else float("inf"))
        if new_tokens
        else None,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_s_all": [r["prefill_s"] for r in timed],
        "decode_s_all": [r["decode_s"] for r in timed],
        "kv_bytes": last["kv_bytes"],
        "kv_storage_bytes": last["kv_storage_bytes"],
        "decode_steps": last["decode_steps"],
        "seq_len_after_decode": last["seq_len_after_decode"],
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if dev.type == "cuda":
        entry["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    return entry


# ---------------------------------------------------------------------------------------------- table
def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of a :func:`benchmark` result."""
    head = [
        f"params {result.get('params', 0):,}",
        f"device {result.get('device')}",
        f"dtype {result.get('dtype')}",
        f"batch {result.get('batch', '?')}",
        f"new_tokens {result.get('new_tokens', '?')}",
    ]
    if result.get("disk_bytes") is not None:
        head.append(f"disk {_mib(result['disk_bytes'])} MiB")
    runs = result.get("runs", [])
    gpu = any("peak_gpu_bytes" in r for r in runs)
    cols = ["context", "prefill tok/s", "decode tok/s", "prefill s", "decode s", "KV MiB", "peak RSS MiB"]
    if gpu:
        cols.append("peak GPU MiB")
    rows = []
    for r in runs:
        row = [
            str(r["context"]),
            f"{r['prefill_tok_s']:.1f}",
            "-" if r.get("decode_tok_s") is None else f"{r['decode_tok_s']:.1f}",
            f"{r['prefill_s']:.4f}",
            f"{r['decode_s']:.4f}",
            _mib(r.get("kv_bytes")),
            _mib(r.get("peak_rss_bytes")),
        ]
        if gpu:
            row.append(_mib(r.get("peak_gpu_bytes")))
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = [", ".join(head)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def merge_rounds(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine results of several `benchmark(..., repeats=1)` calls (rounds interleaved across models, so
    slow drifts of a shared machine hit every model alike) into one result with medians over rounds."""
    if not rounds:
        raise ValueError("no rounds to merge")
    merged = {**rounds[0], "repeats": len(rounds), "runs": []}
    batch, new_tokens = merged["batch"], merged["new_tokens"]
    for per_context in zip(*(r["runs"] for r in rounds)):
        prefill = [s for run in per_context for s in run["prefill_s_all"]]
        decode = [s for run in per_context for s in run["decode_s_all"]]
        p, d = statistics.median(prefill), statistics.median(decode)
        entry = {**per_context[-1], "prefill_s": p, "decode_s": d, "prefill_s_all": prefill, "decode_s_all": decode,
                 "prefill_tok_s": batch * per_context[0]["context"] / p if p > 0 else float("inf"),
                 "decode_tok_s": (batch * new_tokens / d if d > 0 else float("inf")) if new_tokens else None,
                 "peak_rss_bytes": max(run["peak_rss_bytes"] or 0 for run in per_context)}
        merged["runs"].append(entry)
    return merged
