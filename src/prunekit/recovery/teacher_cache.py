"""The teacher's top-K logits, computed once before training and read back from disk during it.

Why: live distillation holds the teacher beside the student, so memory must fit both plus the student's
gradients and optimizer state. When it does not (a 7B teacher next to its pruned 5B student on one machine),
the teacher can run first, alone, over every training window; only its K largest logits per position (and
their token ids) are kept, in safetensors shards. The teacher is then released and the student trains on
`kl_topk_loss` against those, exactly the loss `kl_distill_loss(..., topk=K)` computes from live logits.

Size: windows x seq_len x K x 8 bytes (float32 value + int32 id): 400 windows of 512 at K=64 are 105 MB.

Where: `$PRUNEKIT_CACHE/teacher_logits/<key>/shard-NNNNN.safetensors` plus `meta.json`, keyed by the
teacher's weights fingerprint, the training windows' sha256, K and the teacher's dtype. The folder is built
under a temporary name and renamed when complete, so a killed run never leaves a half cache that a later
run would trust; a later run with the same teacher, data and K reads it instead of running the teacher.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.data import CalibrationData
from prunekit.io.outputs import owned_dir
from prunekit.io.paths import cache_dir
from prunekit.losses import topk_reference
from prunekit.recovery.distill import vocab_size
from prunekit.recovery.sources import fingerprint

SHARD_WINDOWS = 16  # windows per shard file: small enough to rewrite, few enough files for 1M-token runs
DEFAULT_TOPK = 64


@dataclass
class TeacherLogitsCache:
    """Top-K teacher logits of every training window, on disk; `targets(rows)` reads the rows of one batch."""

    directory: Path
    topk: int
    vocab: int
    windows: int
    record: dict[str, Any] = field(default_factory=dict)

    def targets(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [B, T, K] float32, indices [B, T, K] int64) of training windows `rows`, in that order."""
        from safetensors import safe_open

        values, indices = [], []
        for r in rows:
            with safe_open(str(self._shard(r // SHARD_WINDOWS)), framework="pt") as f:
                values.append(f.get_slice("values")[r % SHARD_WINDOWS])
                indices.append(f.get_slice("indices")[r % SHARD_WINDOWS])
        return torch.stack(values), torch.stack(indices).long()

    def _shard(self, k: int) -> Path:
        return shard_path(self.directory, k)


def shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.safetensors"


def cache_key(teacher: nn.Module, data: CalibrationData, topk: int) -> str:
    dtype = str(next(teacher.parameters()).dtype)
    blob = {"teacher": fingerprint(teacher), "data": data.sha256, "shape": list(data.input_ids.shape),
            "topk": topk, "dtype": dtype}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]


def teacher_logits_cache(teacher: nn.Module, data: CalibrationData, topk: int = DEFAULT_TOPK, *,
                         batch_size: int = 4, use_cache: bool = True, progress: bool = False) -> TeacherLogitsCache:
    """Run `teacher` over every window of `data` (or find the result of an earlier run) and return the cache."""
    key = cache_key(teacher, data, topk)
    root = cache_dir() / "teacher_logits"
    final = root / key
    meta = {"key": key, "topk": topk, "vocab": vocab_size(teacher), "windows": len(data.input_ids),
            "seq_len": int(data.input_ids.shape[1]), "data_sha256": data.sha256, "shard_windows": SHARD_WINDOWS}
    cached = use_cache and (final / "meta.json").is_file()
    if not cached:
        with owned_dir(final) as tmp:  # --no-cache over an existing one replaces it
            _write_shards(teacher, data, topk, tmp, batch_size=batch_size, progress=progress)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    record = {**meta, "cache": str(final), "cached": cached}
    return TeacherLogitsCache(final, topk, meta["vocab"], meta["windows"], record)


def _write_shards(teacher: nn.Module, data: CalibrationData, topk: int, folder: Path, *, batch_size: int,
                  progress: bool) -> None:
    from safetensors.torch import save_file

    teacher.eval()
    n = len(data.input_ids)
    starts = range(0, n, SHARD_WINDOWS)
    for k, start in enumerate(tqdm(starts, desc="teacher logits", disable=not progress, leave=False)):
        stop = min(start + SHARD_WINDOWS, n)
        part = CalibrationData(data.input_ids[start:stop], data.attention_mask[start:stop], data.source, data.sha256)
        top = topk_reference(teacher, part, batch_size, topk)
        save_file({"values": torch.cat([v.cpu() for v, _ in top]).contiguous(),
                   "indices": torch.cat([i.to(torch.int32).cpu() for _, i in top]).contiguous()},
                  str(shard_path(folder, k)))
