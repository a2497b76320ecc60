"""The `eval` and `bench` jobs: held-out perplexity (and zero-shot tasks) of one model, and its prefill/decode
speed and memory. Both return plain JSON-able dicts; the CLI checks the output path first and writes them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunekit.adapters import get_adapter
from prunekit.data import eval_windows
from prunekit.evaluation.bench import benchmark
from prunekit.evaluation.perplexity import model_summary, perplexity
from prunekit.evaluation.zeroshot import check_tasks, evaluate_tasks
from prunekit.io.checkpoint import load_model, resolve_model_path
from prunekit.io.files import weight_bytes
from prunekit.io.model_card import check_card_folder, eval_quality, update_measured_quality
from prunekit.jobs.dist import check_device


def eval_job(model: str, *, text: str | Path = "wiki", windows: int = 10, window_len: int = 1024,
             batch_size: int = 1, tasks: Sequence[str] = (), task_dir: str | Path | None = None,
             limit: int | None = None, seed: int = 1234, dtype: str = "float32", device: str = "cpu",
             progress: bool = True, card: bool = False) -> dict[str, Any]:
    """Perplexity over `windows` non-overlapping `window_len`-token windows of the evaluation half of `text`,
    parameter count and KV-cache bytes per token, and (with `tasks`) lm-eval's zero-shot results under
    `"zeroshot"`; `disk_bytes` for a local checkpoint folder. `card`: also put them into the "Measured quality"
    section of the model's card (a prunekit checkpoint folder; its path is returned under `"card"`)."""
    check_device(device)
    if card:
        check_card_folder(model)
    tasks = list(tasks)
    check_tasks(tasks, task_dir=task_dir)  # before the perplexity run, not after it
    lm, tok = load_model(model, dtype=dtype, device=device)
    ids = eval_windows(tok, text, windows, window_len)
    result: dict[str, Any] = {"model": str(model), "text": str(text)}
    result.update(model_summary(get_adapter(lm)))
    result.update(perplexity(lm, ids, batch_size=batch_size, progress=progress))
    if tasks:
        result["zeroshot"] = evaluate_tasks(lm, tok, tasks, task_dir=task_dir, limit=limit, seed=seed, device=device)
    local = Path(str(model))
    if local.is_dir():
        result["disk_bytes"] = weight_bytes(local)
    if card:
        result["card"] = str(update_measured_quality(model, eval_quality(result, dtype=dtype)))
    return result


def bench_job(model: str, *, contexts: Sequence[int] = (128, 512, 1024), new_tokens: int = 32, batch: int = 1,
              repeats: int = 3, dtype: str = "float32", device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Prefill and decode tokens/s, peak memory and KV-cache bytes (`prunekit.evaluation.bench.benchmark`),
    with the model's on-disk weight bytes (None for a hub id not stored locally) and its name."""
    check_device(device)
    lm, _ = load_model(model, dtype=dtype, device=device, tokenizer=False)
    res = benchmark(lm, contexts=contexts, new_tokens=new_tokens, batch=batch, repeats=repeats, progress=progress)
    local = Path(resolve_model_path(model))
    res["disk_bytes"] = weight_bytes(local) if local.is_dir() else None
    res["model"] = str(model)
    return res
