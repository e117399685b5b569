"""Median time of a callable, with each platform's standard tool.

`median_seconds`, what a caller waits for per call. CUDA: `triton.testing.do_bench` (warm-up, L2
flush between reps, CUDA events around each call). A call whose device work is shorter than its
host work (Python, dispatch, the autograd engine, launches) reads as host time: the GPU idles
between kernels. CPU: `torch.utils.benchmark.Timer.blocked_autorange` (thread-count aware,
median of blocks).

`graph_median_seconds`, the device time per call (CUDA only): the call captured as a CUDA graph,
unrolled, and replayed (`triton.testing.do_bench_cudagraph`), so no host time is left in it, and
no L2 flush either (inputs that fit the L2 stay there between calls).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def median_seconds(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(50, int(min_run_time * 1000)), return_mode="median") / 1e3
    from torch.utils.benchmark import Timer

    fn()  # warm-up (first-call dispatch, lazy imports, compile)
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median


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
        # the unrolled graph holds `rep` ms of calls and is replayed 10 times: half min_run_time in all
        ms = do_bench_cudagraph(fn, rep=max(5, int(min_run_time * 50)), return_mode="median")
    except RuntimeError as exc:  # torch's CUDA errors (AcceleratorError included) are RuntimeErrors
        torch.cuda.synchronize()
        warnings.warn(f"{label or 'call'}: not capturable as a CUDA graph, no device time "
                      f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})", stacklevel=2)
        return None
    return ms / 1e3
