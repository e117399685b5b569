"""Peak extra memory of a callable: bytes allocated above what was live when it started.

CUDA: the caching allocator's peak counter. CPU: torch has no peak counter, so the profiler's raw
allocation events (one per malloc and per free, with exact timestamps, from every op including
those inside custom ops) are replayed in time order and the running total's maximum is taken.
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


def peak_extra_bytes(fn: Callable[[], object], device: torch.device, floor: int = 0,
                     setup: Callable[[], object] | None = None) -> int | None:
    """Peak memory of fn() above the starting point, in bytes: CUDA from the caching allocator's
    statistics, CPU from the profiler's allocation events.

    `setup` runs before the measured run, outside the measurement: what it frees (the last run's
    gradients) must not count against fn. A step that freed them itself netted that free against
    its own new gradient, but only when they had been allocated under the profiler, so
    consecutive profiled runs disagreed (a 1 MiB-gradient step read 280 B) and the CPU figure
    was once the largest of three runs. `floor`: bytes fn() is known to allocate and keep (the
    gradients it writes); a CPU peak below it is reported as None (not measured), not as a
    number that would make a bogus memory ratio."""
    if setup is not None:
        setup()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    peak = _profiled_peak(fn)
    return peak if peak >= floor else None


def _profiled_peak(fn: Callable[[], object]) -> int:
    """One run of fn() under the profiler: the peak of the running sum of its raw allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:  # one per malloc (+size) and free (-size)
            deltas.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, delta in sorted(deltas):
        live += delta
        peak = max(peak, live)
    return peak
