"""The one protocol for what observers accumulate, so data-parallel totals and the cache are written once.

Every statistics pass in prunekit (LLM-Drop's cosine sums, TransAct's squared activation sums, compress's
Grams and Fishers) ends in float64 sums over calibration tokens. Sums over disjoint shards of the tokens
add up, so one process's sums become every process's totals by adding tensors, and a cache entry is just
the tensors by name. An accumulator that is `Summable` says how it becomes named tensors and back; the
code that totals (`Sums.total`, an all-reduce under torchrun) and the code that caches (`jobs.cache`) see
only names and tensors, never an algorithm's fields.

A tensor whose name starts with `CONSTANT` is the same in every process (a weight column, a shape) and is
carried as is instead of being summed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import torch

from prunekit.data import CalibrationData

CONSTANT = "const:"

Total = Callable[[torch.Tensor], torch.Tensor]
S = TypeVar("S", bound="Summable")


class Summable(Protocol):
    """An accumulator of float64 sums that round-trips through named CPU tensors."""

    def to_tensors(self) -> dict[str, torch.Tensor]: ...

    @classmethod
    def from_tensors(cls: type[S], tensors: dict[str, torch.Tensor]) -> S: ...


class Sums(Protocol):
    """How a pass sees the calibration data and its sums: `shard` is this process's part of the batches,
    `total` turns this process's float64 sums into the sums over every process."""

    def shard(self, calib: CalibrationData) -> CalibrationData: ...

    def total(self, values: torch.Tensor) -> torch.Tensor: ...


class OneProcess:
    """`Sums` in a single process: all the data, sums as they are."""

    def shard(self, calib: CalibrationData) -> CalibrationData:
        return calib

    def total(self, values: torch.Tensor) -> torch.Tensor:
        return values


def total_tensors(tensors: dict[str, torch.Tensor], total: Total) -> dict[str, torch.Tensor]:
    """Every summed tensor totalled, in sorted name order (so processes' collectives pair up); the
    `CONSTANT` ones as they are."""
    return {k: tensors[k] if k.startswith(CONSTANT) else total(tensors[k]) for k in sorted(tensors)}


def totalled(acc: S, total: Total) -> S:
    """A new accumulator of the same type holding the totals of `acc`'s sums (`acc` is left alone)."""
    return type(acc).from_tensors(total_tensors(acc.to_tensors(), total))
