"""Peak extra memory of a callable: bytes allocated above what was live when it started.

CUDA: the caching allocator's peak counter. CPU: torch has no peak counter, so the profiler's
allocation events are replayed in time order (allocations are attributed to the op that made them,
frees to `[memory]` events) and the running total's maximum is taken. An allocation and free inside
one aten kernel are invisible to that replay; custom ops implemented in Python are not affected,
since their inner aten calls are recorded individually.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's native start/stop lines (written straight to fd 2)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Run fn() once and return its peak memory above the starting point, in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted(
        (e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak
