"""torchrun plumbing: this process's rank, the process group, sharding the calibration batches, and the
all-reduce of what the observers accumulated.

Under `torchrun --nproc-per-node N -m prunekit score ...` every process (rank) reads `RANK` / `WORLD_SIZE`
/ `LOCAL_RANK` from the environment torchrun sets, joins a process group (gloo on the CPU, nccl on CUDA),
runs its share of the calibration batches, and the ranks all-reduce the float64 sums and token counts;
rank 0 writes the output. Sharding is by whole batches (batch b goes to rank b % N), so every batch is
computed exactly as in a single process and the result differs from the single-process one only by the
order of the float64 additions (~1e-16).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from prunekit.data import CalibrationData, token_hash
from prunekit.drop.similarity import SimilarityAccumulator, SimilarityScores
from prunekit.engine.sums import Sums, totalled
from prunekit.errors import DataError, DeviceError, DistributedError
from prunekit.width.stats import WidthStats


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 outside one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DistEnv":
        env = os.environ if environ is None else environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError as e:
            raise DistributedError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from e
        if world < 1 or not 0 <= rank < world:
            raise DistributedError(f"inconsistent torch.distributed environment: RANK={rank}, WORLD_SIZE={world}")
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_device(device: str | torch.device) -> torch.device:
    """A device that exists here (one `DeviceError` for a mistyped name or a missing GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} was asked for but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type not in ("cpu", "mps"):
        raise DeviceError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def resolve_device(device: str | torch.device, env: DistEnv) -> torch.device:
    """`cuda` (or `cuda:LOCAL_RANK`) becomes this rank's GPU, `cuda:LOCAL_RANK`, in a multi-process job. Every
    rank gets the same `--device`, so any other index would put several ranks on one GPU, which NCCL refuses
    only after the group has formed: it is one `DeviceError` here instead."""
    dev = check_device(device)
    if dev.type == "cuda" and env.is_distributed:
        if dev.index is not None and dev.index != env.local_rank:
            raise DeviceError(f"--device {device} under torchrun: each process uses the GPU of its LOCAL_RANK; "
                              "give --device cuda (and choose the GPUs with CUDA_VISIBLE_DEVICES)")
        dev = check_device(f"cuda:{env.local_rank}")
    return dev


@contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[DistEnv]:
    """Join (and finally leave) the default process group when running under torchrun."""
    if not env.is_distributed:
        yield env
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield env
    finally:
        dist.destroy_process_group()


def shard_calibration(calib: CalibrationData, batch_size: int, env: DistEnv, *,
                      allow_empty: bool = False) -> CalibrationData:
    """This rank's batches: b = rank, rank + N, ... of `calib.batches(batch_size)`, as a `CalibrationData`
    whose own batches (same batch size) are exactly those batches. `allow_empty`: a rank may get none (its
    sums are then zero) instead of the error."""
    n_batches = -(-len(calib.input_ids) // batch_size)
    if n_batches < env.world_size and not allow_empty:
        raise DataError(f"{env.world_size} processes need at least {env.world_size} calibration batches, but "
                        f"{len(calib.input_ids)} samples make {n_batches} batches of {batch_size}; lower "
                        "--batch-size or raise --samples")
    if not env.is_distributed:
        return calib
    rows = [r for b in range(env.rank, n_batches, env.world_size)
            for r in range(b * batch_size, min((b + 1) * batch_size, len(calib.input_ids)))]
    idx = torch.tensor(rows, dtype=torch.long)
    ids = calib.input_ids[idx]
    return CalibrationData(ids, calib.attention_mask[idx], calib.source, token_hash(ids))


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The float64 sum of `values` over all ranks, on the CPU (`values` itself is left as this rank's). The
    collective runs on `device` when it is a GPU (nccl), else on the CPU (gloo)."""
    comm = device if device.type == "cuda" else torch.device("cpu")
    t = values.detach().to(comm, torch.float64).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


class AllReduceSums:
    """The data parallel `engine.sums.Sums`: each rank takes its whole batches of every calibration part (a
    short held-out part may leave a rank none) and the float64 sums are all-reduced, so every rank works on
    the same totals and chooses the same model."""

    def __init__(self, env: DistEnv, device: torch.device, batch_size: int):
        self.env = env
        self.device = device
        self.batch_size = batch_size

    def shard(self, calib: CalibrationData) -> CalibrationData:
        return shard_calibration(calib, self.batch_size, self.env, allow_empty=True)

    def total(self, values: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(values, self.device)


class AllReduceScorer:
    """Wraps a scorer that sees this rank's shard: every `score` totals its sums over the ranks (every rank
    gets the global scores, so iterative dropping picks the same module everywhere)."""

    def __init__(self, inner: Any, calibration: dict[str, Any], sums: Sums):
        self.inner = inner
        self.calibration = calibration
        self.sums = sums
        self.acc: SimilarityAccumulator | None = None

    def score(self, start_layer: int = 0) -> SimilarityScores:
        self.inner.score(start_layer)
        self.acc = totalled(self.inner.acc, self.sums.total)
        return self.acc.result(self.calibration)


class AllReduceCollector:
    """Wraps a `width.WidthCollector` that sees this rank's shard: every `collect` totals its statistics over
    the ranks, so every rank plans the same widths."""

    def __init__(self, inner: Any, sums: Sums):
        self.inner = inner
        self.sums = sums

    def collect(self, *, attn: bool = True, mlp: bool = True, desc: str = "width scoring",
                widths: Any = None) -> WidthStats:
        return totalled(self.inner.collect(attn=attn, mlp=mlp, desc=desc, widths=widths), self.sums.total)
