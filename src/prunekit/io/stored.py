"""How a checkpoint's files hold a model's tensors: read in pieces, and written back the same way.

transformers 5 stores some families in another form than their modules hold. Mixture-of-Experts checkpoints
have one tensor per expert (`mlp.experts.3.gate_proj.weight`; Mixtral's hub files
`block_sparse_moe.experts.3.w1.weight`) where the model holds fused 3D tensors (`mlp.experts.gate_up_proj`
[E, 2I, H]). `from_pretrained` converts them with the family's conversion mapping
(`transformers.conversion_mapping`): renamings, and converters whose operations merge lists of stored tensors
(`MergeModulelist` stacks the experts, `Concatenate` joins gate and up). `StoredLayout` reads with that same
mapping, so a layout transformers loads is read here the same way, whatever the family. A plan's cut is
pushed onto the stored tensors first (only the kept experts' tensors are read, each cut to its kept channels),
then the mapping's own operations run on the pieces. `saved_tensors` is the other direction, the names and
values `save_pretrained` writes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from prunekit.adapters.units import Cut, ExpertCut, apply_cut
from prunekit.errors import CheckpointError

try:  # transformers >= 5 converts checkpoint layouts; older versions store the modules' own layout
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
        revert_weight_conversion,
    )
except ImportError:  # pragma: no cover
    get_model_conversion_mapping = None  # type: ignore[assignment]

# Reads stored tensors by name (memory-mapped on the CPU: a slice reads only its pages).
Load = Callable[[list[str]], dict[str, torch.Tensor]]


@dataclass
class _Fused:
    """A module tensor that a converter builds from lists of stored tensors: `sources` maps each of the
    converter's source patterns to its stored names, in the order transformers collects them (natural order of
    the names, so list position j is expert j)."""

    converter: Any
    sources: dict[str, list[str]] = field(default_factory=dict)


class StoredLayout:
    """Where each module tensor of `model` lies among the `stored` tensor names: under its own name, under
    another (`renamed`), or built from several (`fused`). Only tensors the model has are listed."""

    def __init__(self, model: nn.Module, stored: Iterable[str]):
        self.renamed: dict[str, str] = {}
        self.fused: dict[str, _Fused] = {}
        if get_model_conversion_mapping is None:
            return
        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        wanted = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        for name in sorted(stored, key=dot_natural_key):
            target, pattern = rename_source_key(name, renamings, converters, prefix, wanted)
            if target not in wanted and name in wanted:  # as `from_pretrained` does: the stored name fits as is
                target, pattern = name, None
            if target not in wanted:
                continue
            if pattern is None:
                if target != name:
                    self.renamed[target] = name
                continue
            fused = self.fused.setdefault(target, _Fused(by_pattern[pattern]))
            fused.sources.setdefault(pattern, []).append(name)

    def short(self, model: nn.Module) -> list[str]:
        """Fused tensors of `model` that their stored pieces cannot fill: an expert list of another length than
        the tensor's expert count (a missing shard or expert)."""
        wanted = model.state_dict()
        out = []
        for name, fused in self.fused.items():
            ops = fused.converter.operations
            if ops and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0:
                counts = {len(names) for names in fused.sources.values()}
                if counts != {wanted[name].shape[0]} or len(fused.sources) != len(fused.converter.source_patterns):
                    out.append(f"{name} (stored for {min(counts)} of {wanted[name].shape[0]} experts)")
        return out

    def read_fused(self, name: str, load: Load, cut: Cut | None = None, config: Any = None) -> torch.Tensor:
        """Module tensor `name` (a key of `fused`), cut by `cut`, built by the family's own converter."""
        fused = self.fused[name]
        pieces = _cut_pieces(fused, cut, load)
        rest = None
        if pieces is None:  # a conversion this reader cannot cut in pieces: build it whole, then cut
            loaded = load([n for names in fused.sources.values() for n in names])
            pieces = {p: [loaded[n] for n in names] for p, names in fused.sources.items()}
            rest = cut
        converter = copy.deepcopy(fused.converter)  # `convert` consumes what was collected into it
        for pattern, tensors in pieces.items():
            for t in tensors:
                converter.add_tensor(name, name, pattern, lambda t=t: t)
        out = converter.convert(name, config=config)
        if set(out) != {name}:
            raise CheckpointError(f"the checkpoint conversion for {name} gave {sorted(out)}; cannot read it")
        return apply_cut(out[name], rest)


def _as_expert_cut(cut: Cut) -> ExpertCut:
    """A one-dimensional cut of a fused expert tensor [E, ...] as an `ExpertCut`."""
    if isinstance(cut, ExpertCut):
        return cut
    dim, idx = cut
    return ExpertCut(tuple(int(e) for e in idx)) if dim == 0 else ExpertCut(None, dim - 1, idx)


def _cut_pieces(fused: _Fused, cut: Cut | None, load: Load) -> dict[str, list[torch.Tensor]] | None:
    """The stored tensors of the kept experts, each cut to its kept entries, by source pattern: what the
    converter's operations turn into the cut module tensor. None where the operations are other than a
    stack of the experts (`MergeModulelist(dim=0)`), optionally followed by one `Concatenate`, which is all
    this reader knows how to push a cut through."""
    ops = fused.converter.operations
    if not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0:
        return None
    if len(ops) > 2 or (len(ops) == 2 and not (isinstance(ops[1], Concatenate) and ops[1].dim >= 1)):
        return None
    patterns = [p for p in fused.converter.source_patterns if p in fused.sources]
    counts = {len(fused.sources[p]) for p in patterns}
    if len(counts) != 1:
        return None
    ec = _as_expert_cut(cut) if cut is not None else ExpertCut()
    experts = ec.kept(counts.pop())
    loaded = load([fused.sources[p][e] for p in patterns for e in experts])
    items = {p: [loaded[fused.sources[p][e]] for e in experts] for p in patterns}
    # The slice of one expert is the concatenation of its items (one per pattern) along `joined`, if any.
    joined = ops[1].dim - 1 if len(ops) == 2 else None
    out: dict[str, list[torch.Tensor]] = {p: [] for p in patterns}
    for j, e in enumerate(experts):
        rows = ec.rows_of(e)
        if rows is None or joined != ec.dim:  # every item keeps the same entries
            for p in patterns:
                t = items[p][j]
                out[p].append(t if rows is None else t.index_select(ec.dim, rows.to(t.device)))
            continue
        parts = _split_rows(rows, [items[p][j].shape[ec.dim] for p in patterns])
        if parts is None:
            return None
        for p, local in zip(patterns, parts):
            out[p].append(items[p][j].index_select(ec.dim, local.to(items[p][j].device)))
    if any(len({tuple(t.shape) for t in ts}) > 1 for ts in out.values()):
        return None  # experts keep different counts of a pattern's entries: they would not stack
    return out


def _split_rows(rows: torch.Tensor, sizes: list[int]) -> list[torch.Tensor] | None:
    """`rows` of a concatenation of blocks of `sizes` as rows of each block, or None where they do not run
    block by block in order (a cut of the concatenation would then not be the concatenation of the cuts)."""
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    block = torch.bucketize(rows, bounds[1:], right=True)
    if rows.numel() and (bool((block[1:] < block[:-1]).any()) or int(block.max()) >= len(sizes)):
        return None
    return [rows[block == b] - bounds[b] for b in range(len(sizes))]


def saved_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (module tensor names of `model`: all of one layer, or a few others) as `save_pretrained` writes
    them: transformers' reverse conversion (per-expert tensors for a fused MoE tensor, stored names for
    renamed ones). Meta tensors give the saved names, dtypes and shapes."""
    if get_model_conversion_mapping is None:  # pragma: no cover
        return dict(tensors)
    return revert_weight_conversion(model, dict(tensors))
