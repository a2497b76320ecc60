"""Training text for recovery: several sources mixed by weight, and text sampled from the teacher.

Syntax (`--text`): comma-separated sources, each `SOURCE[:WEIGHT]`, e.g. `c4:0.7,wiki:0.3`; weights default
to 1 and are normalised; `mix` stands for every built-in text, weighted by file size, and a text named twice
is one source with the summed weight; `--samples` windows are shared out by weight (largest remainder, every
listed source gets at least one). `teacher:N` is N tokens written by the teacher itself: N // seq_len windows of
`seq_len` tokens, each a `prompt_len`-token prompt cut from the CALIBRATION half of the prompt text and the
teacher's continuation, sampled at temperature `gen_temperature` (0 means greedy) with a seeded generator;
they come on top of the `--samples` windows of the other sources. Every text source contributes windows
from its calibration half only, so training never sees the evaluation half of any text.

Teacher text is generated once and kept in `$PRUNEKIT_CACHE/teacher_text/<key>.safetensors` (written to a
temporary sibling and renamed), keyed by the teacher's weights fingerprint and every generation setting.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.data import CalibrationData, calibration_data, token_hash, token_stream, windows
from prunekit.errors import DataError, RecoveryError
from prunekit.io.assets import BUILTIN_CORPORA, builtin_corpus_path, cache_dir
from prunekit.io.outputs import owned_file

TEACHER = "teacher"
# `--text mix`: every built-in text, each weighted by its size, so the windows spread over all of them and
# a long training run reads each window about once instead of cycling one short text (c4's calibration
# half is 76 windows of 512; the mix's halves hold about 800).
MIX = "mix"
# Sequences sampled together: each generation step reads every weight for one token per sequence, so a
# bigger batch makes more tokens per weight read; 32 keeps the KV cache small (SmolLM2: 0.75 GB at 512 tokens).
GEN_BATCH = 32


@dataclass(frozen=True)
class TextSource:
    """One entry of `--text`: a text (with its mixing weight), or `teacher:N` (N tokens from the teacher)."""

    name: str
    weight: float = 1.0
    teacher_tokens: int | None = None


def parse_text_spec(spec: str) -> list[TextSource]:
    """`c4:0.7,wiki:0.3`, `teacher:20000`, or a single source name/path; `DataError` for a malformed one."""
    out: list[TextSource] = []
    for item in (s.strip() for s in str(spec).split(",")):
        if not item:
            raise DataError(f"empty source in --text {spec!r}")
        head, sep, tail = item.rpartition(":")
        if sep and head == TEACHER:
            try:
                n = int(tail)
            except ValueError:
                raise DataError(f"teacher:N needs a whole number of tokens, got {item!r}") from None
            if n < 1:
                raise DataError(f"teacher:N needs N >= 1 tokens, got {item!r}")
            out.append(TextSource(TEACHER, teacher_tokens=n))
            continue
        if item == TEACHER:
            raise DataError("give the number of teacher tokens: teacher:N")
        try:
            weight = float(tail) if sep else None
        except ValueError:
            weight = None  # a path with ':' in it: the whole item is the name
        name = item if weight is None else head
        if weight is not None and not weight > 0:
            raise DataError(f"the weight of {head!r} must be > 0, got {tail}")
        out.extend(_expand(name, 1.0 if weight is None else weight))
    if sum(s.teacher_tokens is not None for s in out) > 1:
        raise DataError("give teacher:N once")
    return _merge(out)


def _merge(sources: list[TextSource]) -> list[TextSource]:
    """A text named twice (e.g. `mix,c4`) becomes one source with the summed weight, so its windows never
    overlap."""
    weights: dict[str, float] = {}
    for s in sources:
        if s.teacher_tokens is None:
            weights[s.name] = weights.get(s.name, 0.0) + s.weight
    return [TextSource(n, w) for n, w in weights.items()] + [s for s in sources if s.teacher_tokens is not None]


def _expand(name: str, weight: float) -> list[TextSource]:
    """One source, or for `mix` (when no file of that name exists) every built-in text, sharing `weight` by
    file size."""
    if name != MIX or Path(name).exists():
        return [TextSource(name, weight)]
    sizes = {c: builtin_corpus_path(c).stat().st_size for c in BUILTIN_CORPORA}
    total = sum(sizes.values())
    return [TextSource(c, weight * n / total) for c, n in sizes.items()]


def share_samples(sources: list[TextSource], samples: int) -> list[int]:
    """Windows per text source: `samples` split by weight (largest remainder), at least one each."""
    texts = [s for s in sources if s.teacher_tokens is None]
    if len(texts) > samples:
        raise DataError(f"{len(texts)} text sources need at least {len(texts)} samples, got {samples}")
    total = sum(s.weight for s in texts)
    exact = [samples * s.weight / total for s in texts]
    counts = [max(1, int(e)) for e in exact]
    order = sorted(range(len(texts)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(counts) < samples:
        counts[order[i % len(order)]] += 1
        i += 1
    while sum(counts) > samples:  # the at-least-one rule overshot: take from the largest
        counts[max(range(len(counts)), key=counts.__getitem__)] -= 1
    return counts


def default_samples(sources: list[TextSource], *, steps: int, batch_size: int, seq_len: int) -> int:
    """Text windows when `--samples` is not given: as many as the run reads (`steps` x `batch_size`, less the
    teacher:N windows), so no window is seen twice; repeating a few windows many times fits the student to
    them rather than to the teacher (SmolLM2, 64 c4 windows read 6.25 times: training KL 0.48 -> 0.09,
    held-out perplexity stuck at 1.19x dense). At least one per text source."""
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
    texts = [s for s in sources if s.teacher_tokens is None]
    counts = share_samples(sources, samples) if texts else []
    parts: list[torch.Tensor] = []
    records: list[dict[str, Any]] = []
    for s, n in zip(texts, counts):
        stream = token_stream(tokenizer, s.name, "calib")
        if fit:
            n = max(1, min(n, len(stream) // seq_len))
        ids = windows(stream, n, seq_len, what=f"the calib split of {s.name}")
        parts.append(ids)
        records.append({"source": s.name, "weight": s.weight, "samples": n, "split": "calib",
                        "sha256": token_hash(ids)})
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


def calibration_texts(tokenizer: Any, spec: str | Path, samples: int, seq_len: int) -> CalibrationData:
    """Calibration windows of one text (`calibration_data`) or of several, given as `--text` takes them (e.g.
    `c4:2,technical:1,tiny:1`: `samples` shared out by weight, each text's from its calibration half). Several
    texts' windows are interleaved, each text spread evenly over the rows, so that a held-out last quarter
    (`split_check`) holds every text in its share. `teacher:N` is refused (it needs a teacher)."""
    sources = parse_text_spec(str(spec))
    if any(s.teacher_tokens is not None for s in sources):
        raise DataError("calibration text cannot be teacher:N; name texts, e.g. c4 or c4:2,technical:1")
    if len(sources) == 1:
        return calibration_data(tokenizer, sources[0].name, samples, seq_len)
    data, records = training_data(tokenizer, sources, samples, seq_len)
    # Row k of a text with n rows goes (k + 0.5) / n of the way down.
    keys = [(k + 0.5) / r["samples"] for r in records for k in range(r["samples"])]
    ids = data.input_ids[torch.tensor(sorted(range(len(keys)), key=keys.__getitem__))]
    name = ",".join(f"{s.name}:{s.weight:g}" for s in sources)
    return CalibrationData(ids, torch.ones_like(ids), name, token_hash(ids))
