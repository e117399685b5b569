"""Where a training step's time goes: a few steps under torch.profiler, summarised for a JSON record.

    profiler = StepProfiler(device)
    profiler.start()            # at a step boundary
    ...                         # the steps to profile
    summary = profiler.stop()   # at a step boundary

The summary is small enough to travel in the trainer's JSON (no trace file):
  wall_s          wall time of the profiled steps (device synchronised at both ends)
  busy_s          on CUDA, the union of the kernels' intervals: the device was idle for
                  wall_s - busy_s (host-bound launches, host synchronisations, data)
  categories      seconds per kind of work: our Triton kernels, matmul, attention (SDPA's),
                  Inductor's generated kernels, communication, copies, other; on CUDA summed
                  over kernels (overlapping streams count twice), on CPU over the ops' self time
  top             the 25 largest kernels (CPU: ops) with their calls and seconds
  host_syncs      on CUDA, the synchronising calls torch.cuda.set_sync_debug_mode saw, counted
                  per line of the innermost Python frame outside torch (the backward's are
                  replayed by the autograd engine when it finishes: they count at the line that
                  called backward)
Kernel figures leave out the profiler's user-annotation spans (record_function ranges, which
Kineto also puts on the GPU timeline and which would count idle gaps as busy).
"""
from __future__ import annotations

import collections
import functools
import os
import sys
import time
import warnings
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

_TOP = 25
_CATEGORIES = (  # first match wins; names are lower-cased kernel (or op) names
    ("communication", ("nccl", "c10d::", "gloo")),
    ("copies", ("memcpy", "memset", "aten::copy_", "aten::to")),
    ("attention", ("flash", "fmha", "attention", "attn", "cudnn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::linear", "aten::matmul")),
    ("inductor", ("triton_",)),
)


@functools.lru_cache(maxsize=1)
def _our_kernel_names() -> frozenset[str]:
    """Names of the Triton kernels in dinov3_fast.ops (the profiler lists kernels by name)."""
    import importlib
    import pkgutil

    import dinov3_fast.ops as ops

    try:
        import triton
    except ImportError:
        return frozenset()
    names = set()
    for info in pkgutil.walk_packages(ops.__path__, ops.__name__ + "."):
        if info.name.endswith(".triton"):
            module = importlib.import_module(info.name)
            # KernelInterface: a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1
            names |= {n for n, obj in vars(module).items() if isinstance(obj, triton.runtime.KernelInterface)}
    return frozenset(names)


def category(name: str) -> str:
    """The kind of work a kernel (or, on CPU, an op) named `name` does."""
    if name in _our_kernel_names() or name.startswith("dinov3_fast::"):
        return "dinov3_fast"
    low = name.lower()
    for label, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return label
    return "other"


_TORCH_DIR = os.path.join(os.path.dirname(torch.__file__), "")  # with the separator: not torchvision
_SYNC_MESSAGE = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode's warning


def _caller_outside_torch() -> str:
    """'file:line' of the innermost frame of the current stack outside torch, the warnings module
    and this one."""
    frame = sys._getframe(1)  # frames only: extract_stack would read every source line
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_TORCH_DIR) and name != __file__ and \
                frame.f_globals.get("__name__") not in ("warnings", "_py_warnings"):
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class SyncCounter:
    """While active, counts torch.cuda.set_sync_debug_mode's warnings per calling line (`counts`);
    every other warning is shown as usual. Does not switch the debug mode itself."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self._guard = warnings.catch_warnings()

    def __enter__(self) -> "SyncCounter":
        self._guard.__enter__()
        warnings.filterwarnings("always", message=_SYNC_MESSAGE)
        show = warnings.showwarning

        def count_or_show(message, category, filename, lineno, file=None, line=None):
            if _SYNC_MESSAGE in str(message):
                self.counts[_caller_outside_torch()] += 1
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = count_or_show
        return self

    def __exit__(self, *exc) -> None:
        self._guard.__exit__(*exc)


def _busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals, in the intervals' unit / 1e6 (us -> s)."""
    busy, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / 1e6


def _annotation(event) -> bool:
    """A record_function span (Kineto lists those on the GPU timeline too), not work."""
    return bool(getattr(event, "is_user_annotation", False))


class StepProfiler:
    """torch.profiler over a span of training steps; `stop()` returns the summary (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._prof: profile | None = None
        self._syncs: SyncCounter | None = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._sync()
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        if self.cuda:
            self._syncs = SyncCounter().__enter__()
            torch.cuda.set_sync_debug_mode("warn")
        self._t0 = time.perf_counter()

    def abort(self) -> None:
        """Leave profiling after an error, restoring the sync debug mode and the warnings hooks."""
        if self.cuda and self._syncs is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._syncs.__exit__(None, None, None)
            self._syncs = None
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None

    def stop(self) -> dict[str, Any]:
        self._sync()
        wall = time.perf_counter() - self._t0
        syncs = collections.Counter()
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._syncs.__exit__(None, None, None)
            syncs, self._syncs = self._syncs.counts, None
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        return self._summary(prof, wall, syncs)

    def _summary(self, prof: profile, wall: float, syncs: collections.Counter) -> dict[str, Any]:
        want = DeviceType.CUDA if self.cuda else DeviceType.CPU
        rows = [(e.key, e.count, (e.self_device_time_total if self.cuda else e.self_cpu_time_total) / 1e6)
                for e in prof.key_averages() if e.device_type == want and not _annotation(e)]
        rows = [r for r in rows if r[2] > 0]
        categories: dict[str, float] = collections.defaultdict(float)
        for name, _, seconds in rows:
            categories[category(name)] += seconds
        summary = {
            "wall_s": wall,
            "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n, "calls": c, "s": s, "category": category(n)}
                    for n, c, s in sorted(rows, key=lambda r: -r[2])[:_TOP]],
        }
        if self.cuda:
            kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA and not _annotation(e)]
            summary["busy_s"] = _busy_seconds(kernels)
            summary["host_syncs"] = {"total": sum(syncs.values()), "by_line": dict(syncs.most_common(_TOP))}
        return summary


def format_summary(summary: dict[str, Any], steps: int) -> str:
    """A few log lines: per-step wall and busy time, the categories, the host synchronisations."""
    per = 1e3 / max(steps, 1)
    busy = summary.get("busy_s")
    head = f"profile of {steps} step(s): {summary['wall_s'] * per:.1f} ms/step wall"
    if busy is not None:
        head += f", device busy {busy * per:.1f} ms/step ({100 * busy / summary['wall_s']:.0f}%)"
    cats = ", ".join(f"{k} {v * per:.1f}" for k, v in summary["categories"].items())
    lines = [head, f"  ms/step by kind: {cats}"]
    if "host_syncs" in summary:
        lines.append(f"  host synchronisations: {summary['host_syncs']['total'] / max(steps, 1):.1f}/step "
                     + ", ".join(f"{k} x{v}" for k, v in list(summary["host_syncs"]["by_line"].items())[:5]))
    return "\n".join(lines)
