"""Safetensors files of a local checkpoint: where each tensor lives, reading them (memory-mapped), checking
the shard index, and writing a file tensor by tensor. The dtype-name tables are here, once."""

from __future__ import annotations

import json
import math
import struct
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open

from prunekit.errors import CheckpointError, MemoryLimitError
from prunekit.io.limits import gib, memory_headroom

INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names <-> torch dtypes, and the stored size of each.
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
TORCH_DTYPES: dict[str, torch.dtype] = {v: k for k, v in ST_DTYPES.items()}
FLOAT_TYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def stored_itemsize(st_dtype: str) -> int:
    """Bytes per element of a safetensors dtype name (4 for names this table does not know)."""
    dt = TORCH_DTYPES.get(st_dtype)
    return torch.empty((), dtype=dt).element_size() if dt is not None else 4


@contextmanager
def open_safetensors(path: str | Path, device: str | torch.device = "cpu") -> Iterator[Any]:
    """`safetensors.safe_open`, with a damaged or unreadable file reported as one `CheckpointError`."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as st:
            yield st
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download or re-save it") from e
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        raise MemoryLimitError(f"not enough memory to map {path} ({gib(Path(path).stat().st_size)}): "
                               f"{memory_headroom()}; free memory or raise the limit") from e



def read_index(folder: Path) -> dict[str, str] | None:
    """The weight map of a sharded checkpoint (tensor name -> shard file), checked for missing shards; None
    for a single-file checkpoint."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise CheckpointError(f"{index} is corrupt: {e}") from e
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and "/" not in v
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index} is corrupt: weight_map must map tensor names to shard file names")
    missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
    if missing:
        raise CheckpointError(f"{folder} is missing weight shards: {', '.join(missing)}")
    return dict(weight_map)


class CheckpointFiles:
    """Where each tensor of a local safetensors checkpoint lives (one file, or shards with an index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        weight_map = read_index(self.path)
        self.file_of: dict[str, str] = {}
        if weight_map is not None:
            self.file_of = weight_map
            return
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path} has no *.safetensors weights; layer streaming reads safetensors "
                                  "files only (re-save the checkpoint with safe_serialization=True)")
        for f in files:
            with open_safetensors(f) as st:
                for name in st.keys():
                    self.file_of[name] = f.name

    def names(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def _by_file(self, names: Iterable[str]) -> dict[str, list[str]]:
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.file_of:
                raise CheckpointError(f"{self.path} has no tensor {name!r}")
            by_file[self.file_of[name]].append(name)
        return by_file

    def numel_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of all tensors once loaded in `dtype` (floating tensors; others keep their stored size)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        total = 0
        for f, names in self._by_file(self.file_of).items():
            with open_safetensors(self.path / f) as st:
                for name in names:
                    sl = st.get_slice(name)
                    t = sl.get_dtype()
                    total += math.prod(sl.get_shape()) * (itemsize if t in FLOAT_TYPES else stored_itemsize(t))
        return total

    def load(self, names: Iterable[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Tensors by name. On the CPU they are memory-mapped views of the files (no copy is made until a
        dtype conversion asks for one; pages are read when touched and go with the tensor)."""
        out: dict[str, torch.Tensor] = {}
        for f, group in self._by_file(names).items():
            with open_safetensors(self.path / f, device) as st:
                for name in group:
                    out[name] = st.get_tensor(name)
        return out

    def first_float_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating tensor stored (what the checkpoint is saved in)."""
        for n, f in self.file_of.items():
            with open_safetensors(self.path / f) as st:
                t = st.get_slice(n).get_dtype()
            if t in ("F32", "F16", "BF16"):
                return TORCH_DTYPES[t]
        return None


def tensor_bytes(path: str | Path) -> int:
    """Bytes of tensor data (excluding safetensors headers) in a checkpoint directory."""
    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with open_safetensors(f) as st:
            for name in st.keys():
                sl = st.get_slice(name)
                total += math.prod(sl.get_shape()) * stored_itemsize(sl.get_dtype())
    return total


def weight_bytes(path: str | Path) -> int:
    """Bytes of the weight files of a checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, so a shard never has to be held in memory.

    Why our own writer: the safetensors package writes a whole dict of tensors at once. The file format is
    the documented one (little-endian u64 header length, a JSON header with every tensor's dtype, shape and
    byte range, padded with spaces to 8 bytes, then the raw little-endian data). The header is written first
    from the names, dtypes and shapes given up front, which the streamed saver knows from the pruned meta
    skeleton; `write` must then be called for exactly those tensors, in order, and raises `CheckpointError`
    on any mismatch. The file is only complete when the context exits cleanly."""

    def __init__(self, path: str | Path, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        if sys.byteorder != "little":  # the raw bytes below are written in the machine's order
            raise CheckpointError("streamed saving writes safetensors data as-is and needs a little-endian machine")
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in specs:
            if dtype not in ST_DTYPES:
                raise CheckpointError(f"cannot write {name!r}: dtype {dtype} has no safetensors name")
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.specs = list(specs)
        self.done = 0
        self.path = Path(path)
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__/close
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.done >= len(self.specs):
            raise CheckpointError(f"internal error: {name} is one tensor more than {self.path.name} announced")
        want, dtype, shape = self.specs[self.done]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            # Would mean that the two surgeries (meta skeleton vs materialised layer) disagree.
            raise CheckpointError(f"internal error: got {name} {tensor.dtype} {tuple(tensor.shape)} where "
                                  f"{want} {dtype} {shape} was expected")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            # A uint8 view of the tensor's memory: written without a copy.
            self.file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.done += 1

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()
        if exc_type is None and self.done != len(self.specs):
            raise CheckpointError(f"internal error: {self.path.name} got {self.done} of {len(self.specs)} tensors")
