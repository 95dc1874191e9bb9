"""Step timing and peak memory for the bench scripts, the same way on CUDA and on CPU.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation at ``baseline``;
on CPU the peak resident set (``ru_maxrss``) above the resident set at ``baseline``.
"""

from __future__ import annotations

import resource
import time

import psutil
import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def baseline(device: str) -> int:
    """Start measuring peak memory here; returns the bytes in use now."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return psutil.Process().memory_info().rss


def peak_since(base: int, device: str) -> int:
    """Peak bytes in use since ``baseline`` returned ``base``, above it."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def time_steps(step, device: str, n: int) -> list[float]:
    """Wall seconds of ``n`` calls of ``step``, each between device synchronisations."""
    times = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return times
