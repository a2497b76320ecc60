"""Training text for recovery: several sources mixed by weight, and text sampled from the teacher.

Syntax (`--text`): a text spec as `prunekit.data` parses it, e.g. `c4:0.7,wiki:0.3` or `mix`; `--samples` windows
are shared out by weight over the texts. `teacher:N` is N tokens written by the teacher itself: N // seq_len
windows of `seq_len` tokens, each a `prompt_len`-token prompt cut from the CALIBRATION half of the prompt text and
the teacher's continuation, sampled at temperature `gen_temperature` (0 means greedy) with a seeded generator; they
come on top of the `--samples` windows of the other sources. Every text source contributes windows from its
calibration half only, so training never sees the evaluation half of any text.

Teacher text is generated once and kept in `$PRUNEKIT_CACHE/teacher_text/<key>.safetensors` (written to a
temporary sibling and renamed), keyed by the teacher's weights fingerprint and every generation setting.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.data import (
    TEACHER,
    CalibrationData,
    TextSource,
    calibration_texts,
    parse_text_spec,
    share_samples,
    text_windows,
    token_hash,
    token_stream,
    windows,
)
from prunekit.errors import RecoveryError
from prunekit.io.assets import cache_dir
from prunekit.io.outputs import owned_file

__all__ = ["GEN_BATCH", "calibration_texts", "check_text_spec", "default_samples", "fingerprint", "teacher_text",
           "training_data"]
# `calibration_texts` lives in prunekit.data (the pruning jobs need it without recovery); it stays importable
# from here for benchmarks/bench_compress_calibration.py.

# Sequences sampled together: each generation step reads every weight for one token per sequence, so a
# bigger batch makes more tokens per weight read; 32 keeps the KV cache small (SmolLM2: 0.75 GB at 512 tokens).
GEN_BATCH = 32


def default_samples(sources: list[TextSource], *, steps: int, batch_size: int, seq_len: int) -> int:
    """Text windows when `--samples` is not given: as many as the run reads (`steps` x `batch_size`, less the
    teacher:N windows), so no window is seen twice: repeating a few windows many times fits the student to
    them rather than to the teacher (docs/decisions.md, "Healing"). At least one per text source."""
    teacher_rows = sum((s.teacher_tokens or 0) // seq_len for s in sources)
    texts = sum(s.teacher_tokens is None for s in sources)
    return max(steps * batch_size - teacher_rows, texts, 1)


def check_text_spec(sources: list[TextSource], *, samples: int, seq_len: int, batch_size: int,
                    has_teacher: bool) -> None:
    """Errors that need no model: teacher:N without a teacher or too small for one batch, too few samples."""
    for s in sources:
        if s.teacher_tokens is None:
            continue
        if not has_teacher:
            raise RecoveryError("--text teacher:N samples text from the teacher; give --teacher")
        if s.teacher_tokens < batch_size * seq_len:
            raise RecoveryError(f"teacher:{s.teacher_tokens} is less than one batch ({batch_size} x {seq_len} = "
                                f"{batch_size * seq_len} tokens)")
    if any(s.teacher_tokens is None for s in sources):
        share_samples(sources, samples)


def fingerprint(model: nn.Module) -> str:
    """sha256 of a model's config and every tensor (names, shapes, dtypes, bytes): the teacher-text cache key."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def _sample(teacher: nn.Module, prompts: torch.Tensor, length: int, temperature: float,
            gen: torch.Generator) -> torch.Tensor:
    """Continue `prompts` [B, P] to `length` tokens with the KV cache; sampling draws from `gen` (CPU)."""
    device = next(teacher.parameters()).device
    ids = prompts.to(device)
    out = teacher(input_ids=ids, use_cache=True)
    while ids.shape[1] < length:
        logits = out.logits[:, -1].float().cpu()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[:, 0]
        ids = torch.cat([ids, nxt[:, None].to(device)], 1)
        if ids.shape[1] < length:
            out = teacher(input_ids=nxt[:, None].to(device), past_key_values=out.past_key_values, use_cache=True)
    return ids.cpu()


def teacher_text(teacher: nn.Module, tokenizer: Any, n_tokens: int, seq_len: int, *, prompt_text: str = "c4",
                 prompt_len: int = 16, temperature: float = 1.0, seed: int = 0, batch_size: int = GEN_BATCH,
                 use_cache: bool = True, progress: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """`n_tokens // seq_len` windows written by `teacher` (see the module doc) and their record; read from
    the cache when the same teacher and settings were used before."""
    rows = n_tokens // seq_len
    if rows < 1:
        raise RecoveryError(f"teacher:{n_tokens} is less than one window of {seq_len} tokens")
    if not 1 <= prompt_len < seq_len:
        raise RecoveryError(f"the prompt length must be in [1, {seq_len}), got {prompt_len}")
    if not temperature >= 0:
        raise RecoveryError(f"the sampling temperature must be >= 0 (0: greedy), got {temperature}")
    prompts = windows(token_stream(tokenizer, prompt_text, "calib"), rows, prompt_len,
                      what=f"the calibration half of {prompt_text} (teacher prompts)")
    settings = {"rows": rows, "seq_len": seq_len, "prompt_text": str(prompt_text), "prompt_len": prompt_len,
                "prompts_sha256": token_hash(prompts), "temperature": temperature, "seed": seed,
                "batch_size": batch_size,  # the sampler's random draws are shared out over the batch
                "sampling": "greedy" if temperature == 0 else f"multinomial at temperature {temperature}"}
    key = hashlib.sha256(json.dumps({"teacher": fingerprint(teacher), **settings}, sort_keys=True).encode())
    path = cache_dir() / "teacher_text" / f"{key.hexdigest()[:32]}.safetensors"
    record = {"source": f"{TEACHER}:{n_tokens}", **settings, "cache": str(path), "cached": False}
    if use_cache and path.is_file():
        from safetensors.torch import load_file

        ids = load_file(str(path))["input_ids"]
        record["cached"] = True
    else:
        gen = torch.Generator().manual_seed(seed)
        from tqdm.auto import tqdm

        parts = [_sample(teacher, prompts[i: i + batch_size], seq_len, temperature, gen)
                 for i in tqdm(range(0, rows, batch_size), desc="teacher text", disable=not progress, leave=False)]
        ids = torch.cat(parts)
        if use_cache:
            _save_atomic(ids, path)
    record["sha256"] = token_hash(ids)
    return ids, record


def _save_atomic(ids: torch.Tensor, path: Path) -> None:
    from safetensors.torch import save_file

    with owned_file(path) as tmp:
        save_file({"input_ids": ids.contiguous()}, str(tmp))


def training_data(tokenizer: Any, spec: str | list[TextSource], samples: int, seq_len: int, *,
                  teacher: nn.Module | None = None, prompt_text: str = "c4", gen_temperature: float = 1.0,
                  seed: int = 0, use_cache: bool = True, fit: bool = False,
                  progress: bool = False) -> tuple[CalibrationData, list[dict[str, Any]]]:
    """All training windows of `spec` (calibration halves and teacher text) and one record per source
    (name, weight, windows, sha256). `fit`: a source asked for more windows than its calibration half holds
    gives all it has instead of an error (for the default `samples`, which the user did not choose)."""
    sources = parse_text_spec(spec) if isinstance(spec, str) else spec
    parts, records = text_windows(tokenizer, sources, samples, seq_len, fit=fit)
    for s in sources:
        if s.teacher_tokens is not None:
            if teacher is None:
                raise RecoveryError("--text teacher:N samples text from the teacher; give --teacher")
            ids, rec = teacher_text(teacher, tokenizer, s.teacher_tokens, seq_len, prompt_text=prompt_text,
                                    temperature=gen_temperature, seed=seed, use_cache=use_cache,
                                    progress=progress)
            parts.append(ids)
            records.append({**rec, "samples": len(ids)})
    ids = torch.cat(parts)
    name = ",".join(s.name if s.teacher_tokens is None else f"{TEACHER}:{s.teacher_tokens}" for s in sources)
    return CalibrationData(ids, torch.ones_like(ids), name, token_hash(ids)), records
