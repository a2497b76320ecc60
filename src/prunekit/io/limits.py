"""What memory this process may still use: one source for the streaming decisions, the memory preflights and
the out-of-memory messages."""

from __future__ import annotations

import resource
from pathlib import Path

import psutil


def available_memory_bytes() -> int:
    """Memory this process can still use: MemAvailable, capped by a cgroup v2 limit (containers) when set."""
    avail = int(psutil.virtual_memory().available)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def memory_headroom() -> str:
    """What this process may still use, in words: available memory, and the address-space limit (`ulimit -v`)."""
    text = f"{gib(available_memory_bytes())} of memory is available"
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = psutil.Process().memory_info().vms
        text += f", and the address-space limit (ulimit -v) leaves {gib(max(0, soft - used))} of {gib(soft)}"
    return text
