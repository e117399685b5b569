"""Median wall time of a callable, with each platform's standard tool.

CUDA: `triton.testing.do_bench` (warm-up, L2 flush between reps, CUDA events). CPU:
`torch.utils.benchmark.Timer.blocked_autorange` (thread-count aware, median of blocks).
"""
from __future__ import annotations

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
