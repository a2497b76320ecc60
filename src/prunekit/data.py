"""Text loading, deterministic calibration/evaluation splits, and token windows.

A text source (built-in corpus name, .txt file, or .jsonl with a "text" field) becomes one token stream
(documents joined by EOS). The first half of the stream is the *calibration* split and the second half the
*evaluation* split, so the same source never feeds both. Windows are non-overlapping and chosen
deterministically; the calibration tokens are hashed into every plan for provenance.

Several texts are mixed with a text spec (`--calib` of the pruning commands, `--text` of `heal`):
comma-separated sources, each `SOURCE[:WEIGHT]`, e.g. `c4:0.7,wiki:0.3`; weights default to 1 and are
normalised; `mix` stands for every built-in text, weighted by file size, and a text named twice is one source
with the summed weight; the windows are shared out by weight (largest remainder, every listed source gets at
least one), each text's from its calibration half. `teacher:N` (text written by a teacher, for `heal`) is parsed
here and produced by `prunekit.recovery.sources`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from prunekit.errors import DataError
from prunekit.io.assets import BUILTIN_CORPORA, builtin_corpus_path

Split = Literal["calib", "eval", "all"]

# `teacher:N` in a text spec: N tokens written by the teacher (`heal` only).
TEACHER = "teacher"
# `--text mix`: every built-in text, each weighted by its size, so the windows spread over all of them and
# a long training run reads each window about once instead of cycling one short text (c4's calibration
# half is 76 windows of 512; the mix's halves hold about 800).
MIX = "mix"

_DOC_TAG = re.compile(r"<doc[^>]*>|</doc>")


def read_documents(source: str | Path) -> list[str]:
    """Documents of a built-in corpus or a local file (.jsonl: one {"text": ...} per line; otherwise plain
    text, documents separated by blank lines or <doc> tags)."""
    src = str(source)
    path = builtin_corpus_path(src) if src in BUILTIN_CORPORA and not Path(src).exists() else Path(src)
    if not path.is_file():
        raise DataError(f"text source {src!r} is neither a built-in corpus ({', '.join(BUILTIN_CORPORA)}) nor a file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: expected a JSON object with a 'text' field ({e})") from e
    elif "<doc" in raw:
        docs = [d.strip() for d in _DOC_TAG.split(raw)]
    else:
        docs = [d.strip() for d in re.split(r"\n\s*\n", raw)]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{path} holds no text")
    return docs


def token_stream(tokenizer: Any, source: str | Path, split: Split = "all") -> torch.Tensor:
    """1-D tensor of token ids for `source`, restricted to one half for the calib/eval splits."""
    docs = read_documents(source)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    stream = torch.tensor(ids, dtype=torch.long)
    half = len(stream) // 2
    if split == "calib":
        return stream[:half]
    if split == "eval":
        return stream[half:]
    return stream


def windows(stream: torch.Tensor, n: int, length: int, *, spread: bool = True, what: str = "text") -> torch.Tensor:
    """`n` non-overlapping windows of `length` tokens, as an [n, length] tensor.

    With `spread`, windows are evenly spaced over the whole stream (more varied calibration data);
    otherwise they are consecutive from the start. Raises `DataError` when the text is too short."""
    if n < 1 or length < 2:
        raise DataError(f"need at least 1 window of at least 2 tokens (got {n} x {length})")
    need = n * length
    if len(stream) < need:
        raise DataError(
            f"{what} has {len(stream)} tokens but {n} x {length} = {need} were asked for; "
            "use fewer/shorter samples or a longer text"
        )
    stride = (len(stream) // n) if spread else length
    return torch.stack([stream[i * stride: i * stride + length] for i in range(n)])


def token_hash(tokens: torch.Tensor) -> str:
    """sha256 of the exact token ids (int64, row-major): identifies the calibration data in a plan."""
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class CalibrationData:
    """Calibration batches plus their provenance."""

    input_ids: torch.Tensor  # [samples, seq_len]
    attention_mask: torch.Tensor  # [samples, seq_len], 1 = real token
    source: str
    sha256: str

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (self.input_ids[i: i + batch_size], self.attention_mask[i: i + batch_size])
            for i in range(0, len(self.input_ids), batch_size)
        ]

    def describe(self) -> dict[str, Any]:
        s, t = self.input_ids.shape
        return {"source": self.source, "samples": int(s), "seq_len": int(t), "tokens": self.num_tokens,
                "sha256": self.sha256}


def calibration_data(tokenizer: Any, source: str | Path, samples: int = 16, seq_len: int = 512,
                     split: Split = "calib") -> CalibrationData:
    stream = token_stream(tokenizer, source, split)
    ids = windows(stream, samples, seq_len, what=f"the {split} split of {source}")
    return CalibrationData(ids, torch.ones_like(ids), str(source), token_hash(ids))


def eval_windows(tokenizer: Any, source: str | Path, n: int = 10, length: int = 1024,
                 split: Split = "eval") -> torch.Tensor:
    stream = token_stream(tokenizer, source, split)
    return windows(stream, n, length, spread=False, what=f"the {split} split of {source}")


# ------------------------------------------------------------------------------------------ text specs
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


def text_windows(tokenizer: Any, sources: list[TextSource], samples: int, seq_len: int, *,
                 fit: bool = False) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """The calibration-half windows of the text sources of a spec (`samples` shared out by weight; `teacher:N`
    entries are skipped), one [n, seq_len] tensor and one record (name, weight, windows, sha256) per text, in
    spec order. `fit`: a text asked for more windows than its calibration half holds gives all it has instead
    of an error."""
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
    return parts, records


def calibration_texts(tokenizer: Any, spec: str | Path, samples: int, seq_len: int) -> CalibrationData:
    """Calibration windows of one text (`calibration_data`) or of several, given as a text spec (e.g.
    `c4:2,technical:1,tiny:1`: `samples` shared out by weight, each text's from its calibration half). Several
    texts' windows are interleaved, each text spread evenly over the rows, so that a held-out last quarter
    (`split_check`) holds every text in its share. `teacher:N` is refused (it needs a teacher)."""
    sources = parse_text_spec(str(spec))
    if any(s.teacher_tokens is not None for s in sources):
        raise DataError("calibration text cannot be teacher:N; name texts, e.g. c4 or c4:2,technical:1")
    if len(sources) == 1:
        return calibration_data(tokenizer, sources[0].name, samples, seq_len)
    parts, records = text_windows(tokenizer, sources, samples, seq_len)
    # Row k of a text with n rows goes (k + 0.5) / n of the way down.
    keys = [(k + 0.5) / r["samples"] for r in records for k in range(r["samples"])]
    ids = torch.cat(parts)[torch.tensor(sorted(range(len(keys)), key=keys.__getitem__))]
    name = ",".join(f"{s.name}:{s.weight:g}" for s in sources)
    return CalibrationData(ids, torch.ones_like(ids), name, token_hash(ids))
