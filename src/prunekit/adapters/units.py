"""Prunable units and the rows and columns they own, fused tensors or not.

A sub-layer's width is counted in units of three kinds: `heads` (a query head: its rows of the query
projection and its columns of the output projection), `kv_heads` (a KV head: its rows of the key and value
projections; with GQA it serves `heads // kv_heads` query heads, which the surgery keeps consistent) and
`channels` (an MLP intermediate channel: its rows of gate and up, its column of down). Each kind is a list of
`UnitBlock`s, one per stretch of a tensor that the kind's units tile; a fused tensor (Phi-3's `qkv_proj`,
`gate_up_proj`) simply holds several blocks at different offsets. Width surgery, the streamed reader's
slices and everything else that cuts units go through these blocks, so a family with another layout needs a
layout here, not new surgery.

For Phi-3 (4 heads, 2 KV heads, head size 16, 128 channels) the blocks are:

    heads:    qkv_proj rows 0..63 (16 per unit), o_proj columns 0..63 (16 per unit)
    kv_heads: qkv_proj rows 64..95 and 96..127 (16 per unit: key, then value)
    channels: gate_up_proj rows 0..127 and 128..255 (1 per unit: gate, then up), down_proj columns 0..127
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

UnitKind = Literal["heads", "kv_heads", "channels"]
ATTN_KINDS: tuple[UnitKind, ...] = ("heads", "kv_heads")
MLP_KINDS: tuple[UnitKind, ...] = ("channels",)


@dataclass(frozen=True)
class UnitBlock:
    """Units 0..count-1 of one kind tile `module`'s dimension `dim` (0: output rows and the bias; 1: input
    columns) from `offset`, `size` rows or columns each. `module` is a path relative to the decoder layer."""

    module: str
    dim: int
    offset: int
    size: int
    count: int

    def indices(self, keep: Sequence[int]) -> torch.Tensor:
        """The rows (or columns) of this block that units `keep` (ascending) own, in order."""
        units = torch.tensor(list(keep), dtype=torch.long).unsqueeze(1)
        return (self.offset + units * self.size + torch.arange(self.size)).reshape(-1)

    @property
    def end(self) -> int:
        return self.offset + self.count * self.size


@dataclass(frozen=True)
class Widths:
    """A sub-layer's unit counts and head size, as the layout functions need them."""

    heads: int
    kv_heads: int
    channels: int
    head_dim: int


def kept_indices(blocks: Sequence[tuple[UnitBlock, Sequence[int]]]) -> dict[tuple[str, int], tuple[torch.Tensor, int]]:
    """{(module, dim): (the indices to keep, the size the blocks span)} from blocks with their kept units. The
    blocks of one (module, dim) must tile it from 0 without gaps (checked), so every kept index is accounted
    for; the caller checks the span against the tensor."""
    by_slot: dict[tuple[str, int], list[tuple[UnitBlock, Sequence[int]]]] = {}
    for block, keep in blocks:
        by_slot.setdefault((block.module, block.dim), []).append((block, keep))
    out: dict[tuple[str, int], tuple[torch.Tensor, int]] = {}
    for slot, entries in by_slot.items():
        entries.sort(key=lambda e: e[0].offset)
        pos = 0
        for block, _ in entries:
            if block.offset != pos:
                raise ValueError(f"unit blocks of {slot[0]} (dim {slot[1]}) leave a gap or overlap at {pos}")
            pos = block.end
        out[slot] = (torch.cat([block.indices(keep) for block, keep in entries]), pos)
    return out


@dataclass(frozen=True)
class ExpertCut:
    """What a plan keeps of a fused expert tensor `t` [E, ...]: the experts `experts` (ascending; None: all), and
    of each kept expert e's slice `t[e]` the entries `rows` along the slice's dimension `dim` (one index for
    every expert, or a dict from an expert's index in `t` to its own; None: all entries). Each expert may keep
    its own entries, so this is not one `index_select`. Expert surgery cuts the fused tensor with it; the
    streamed reader cuts each expert's stored tensor before the experts are stacked."""

    experts: tuple[int, ...] | None = None
    dim: int = 0
    rows: torch.Tensor | dict[int, torch.Tensor] | None = None

    def kept(self, count: int) -> list[int]:
        """The kept experts of a tensor holding `count` experts."""
        return list(range(count)) if self.experts is None else list(self.experts)

    def rows_of(self, e: int) -> torch.Tensor | None:
        return self.rows[e] if isinstance(self.rows, dict) else self.rows

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """`t` cut to the kept experts and, within each, to its kept entries (a new tensor)."""
        parts = []
        for e in self.kept(t.shape[0]):
            rows = self.rows_of(e)
            parts.append(t[e] if rows is None else t[e].index_select(self.dim, rows.to(t.device)))
        return torch.stack(parts)


# What to keep of one stored tensor: (dim, kept indices) along one dimension, or an expert tensor's cut.
Cut = tuple[int, torch.Tensor] | ExpertCut


def apply_cut(t: torch.Tensor, cut: Cut | None) -> torch.Tensor:
    """`t` cut by `cut` (itself when None)."""
    if cut is None:
        return t
    if isinstance(cut, ExpertCut):
        return cut.apply(t)
    return t.index_select(cut[0], cut[1].to(t.device))
