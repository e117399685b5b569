"""Median time of a callable: what a caller waits for per call, and (CUDA) the device time alone.

`median_seconds`, what a caller waits for per call, over at least `MIN_REPS` calls.
  CUDA: CUDA events around each call, the L2 flushed before it, and the device drained after the
  flush, so the start stamp is taken on an idle GPU when the host reaches the call: a call whose
  host work (Python, dispatch, the autograd engine, launches) outlasts its device work reads as
  host time, and none of its launches hide behind the flush. (`triton.testing.do_bench` records
  the start event right behind the flush, so up to the flush's duration, ~90 us on an H100, of
  the call's host time went unmeasured.)
  CPU: `torch.utils.benchmark.Timer.blocked_autorange` (thread-count aware, median of blocks).

`graph_median_seconds`, the device time per call (CUDA only): the call captured as a CUDA graph,
unrolled, and replayed (`triton.testing.do_bench_cudagraph`), so no host time is left in it, and
no L2 flush either (inputs that fit the L2 stay there between calls).
"""
from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch

MIN_REPS = 20          # a median of fewer calls moves with a single outlier
_MAX_REPS = 1000       # a microsecond call needs no more; each rep also pays a flush and a sync
_L2_FLUSH_BYTES = 256 << 20  # several times any current L2 (H100 50 MiB, B200 126 MiB)


def _wall_seconds(fn: Callable[[], object], sync: Callable[[], None], calls: int = 3) -> float:
    """Mean wall time of `calls` synchronised calls: the estimate that sizes the measurement."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
        sync()
    return (time.perf_counter() - start) / calls


def _cuda_median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    fn()  # first call: compilation, autotuning, allocator growth
    torch.cuda.synchronize()
    estimate = _wall_seconds(fn, torch.cuda.synchronize)
    for _ in range(max(1, int(0.025 / estimate))):  # ~25 ms of warm-up (clocks, caches)
        fn()
    reps = min(_MAX_REPS, max(MIN_REPS, int(min_run_time / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.zero_()
        torch.cuda.synchronize()  # the flush done: nothing of fn's host time overlaps it
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def median_seconds(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> float:
    """Median seconds per call of fn as its caller waits for it, over at least `min_run_time`
    seconds of calls and at least `MIN_REPS` calls."""
    if device.type == "cuda":
        return _cuda_median_seconds(fn, min_run_time)
    from torch.utils.benchmark import Timer

    fn()  # warm-up (first-call dispatch, lazy imports, compile)
    estimate = _wall_seconds(fn, lambda: None, calls=1)
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=max(min_run_time, MIN_REPS * estimate)).median


def graph_median_seconds(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5,
                         label: str = "") -> float | None:
    """Median device seconds per call of fn, replayed from a CUDA graph; None on a CPU device, or
    when fn cannot be captured (a host synchronisation such as `.item()`, an op that refuses
    capture): then a warning names `label` and the error, and the CUDA context stays usable.
    Grad mode is the caller's (capture runs on the calling thread)."""
    if device.type != "cuda":
        return None
    from triton.testing import do_bench_cudagraph

    try:
        # A host synchronisation is refused by one eager call first, before any capture. A capture
        # that fails can leave the caching allocator counting a capture that never ended
        # (pytorch#180395, fixed in 2.12; the device runs 2.11) and keeps the graph's private pool
        # reserved for the rest of the process (pytorch#190348): every later case of the run would
        # lose memory and empty_cache's effect.
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        # the unrolled graph holds `rep` ms of calls and is replayed 10 times: half min_run_time in all
        ms = do_bench_cudagraph(fn, rep=max(5, int(min_run_time * 50)), return_mode="median")
    except RuntimeError as exc:  # torch's CUDA errors (AcceleratorError included) are RuntimeErrors
        torch.cuda.synchronize()
        warnings.warn(f"{label or 'call'}: not capturable as a CUDA graph, no device time "
                      f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})", stacklevel=2)
        return None
    return ms / 1e3
