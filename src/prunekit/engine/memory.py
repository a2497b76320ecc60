"""How much memory is free, and whether a checkpoint should be layer-streamed instead of loaded whole."""

from __future__ import annotations

from pathlib import Path

import torch

from prunekit.io.checkpoint import parse_dtype, resolve_model_path
from prunekit.io.files import CheckpointFiles
from prunekit.io.limits import available_memory_bytes


def device_free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device as this process can use it, or the host's available memory for the CPU:
    what the driver reports free plus the blocks PyTorch's caching allocator holds but no tensor uses (they
    count as used for the driver, yet this process gets them first)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    return available_memory_bytes()


STREAM_HEADROOM = 1.3  # loaded weights x this: loading copies, activations, the Python process


def checkpoint_bytes(path: str | Path, dtype: str | torch.dtype = "float32") -> int | None:
    """Bytes of a local checkpoint's weights once loaded in `dtype`; None for a model that is not a local
    safetensors checkpoint (a hub id), whose size is not known before loading."""
    local = Path(resolve_model_path(path))
    if not local.is_dir() or not list(local.glob("*.safetensors")):
        return None
    return CheckpointFiles(local).numel_bytes(parse_dtype(dtype))


def should_stream(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                  *, headroom: float = STREAM_HEADROOM) -> bool:
    """Whether the checkpoint would not fit: its weights in `dtype`, times `headroom` (loading copies,
    activations, the Python process), exceed the free memory of `device`. A non-local model (hub id) is
    never streamed (streaming reads local safetensors files)."""
    need = checkpoint_bytes(path, dtype)
    return need is not None and need * headroom > device_free_bytes(torch.device(device))
