"""Text loading, deterministic calibration/evaluation splits, and token windows.

A text source (built-in corpus name, .txt file, or .jsonl with a "text" field) becomes one token stream
(documents joined by EOS). The first half of the stream is the *calibration* split and the second half the
*evaluation* split, so the same source never feeds both. Windows are non-overlapping and chosen
deterministically; the calibration tokens are hashed into every plan for provenance.
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
