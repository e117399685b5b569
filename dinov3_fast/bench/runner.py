"""Run benchmark cases: time, peak memory and roofline fraction of every implementation of a case,
all measured in the same process so ratios to the baseline (the case's first impl) are fair."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from dinov3_fast.bench.case import BenchCase
from dinov3_fast.bench.memory import peak_extra_bytes
from dinov3_fast.bench.roofline import Roofline
from dinov3_fast.bench.timing import graph_median_seconds, median_seconds


# What the figures of a run mean, recorded in its JSON (meta["harness"]); bump it when timing or
# accounting changes. 1 (no field): before commit 7b2ee96, triton's do_bench timing, which hid up
# to ~90 us of host time per call behind the L2 flush, and the crop-list and RoPE cases timed an
# added cat / sum. 2: CUDA events after a drained flush, every output back-propagated.
HARNESS = 2


@dataclass
class BenchRow:
    op: str
    preset: str
    impl: str
    fwd_ms: float             # per call, as the caller waits for it (host time where that dominates)
    fwd_bwd_ms: float | None
    peak_mb: float | None     # peak extra memory of forward+backward (forward alone if no backward);
                              # None where the CPU profiler missed allocations (see bench/memory.py)
    speedup: float | None     # baseline time / this time (forward+backward when measured)
    mem_ratio: float | None   # baseline peak / this peak
    tflops: float | None      # forward matmul FLOPs this impl executes / forward time
    flops_frac: float | None  # tflops / measured matmul peak of the dtype the impl computes in
    gbps: float | None        # forward bytes (BenchCase.bytes) / forward time
    bw_frac: float | None     # gbps / measured copy bandwidth
    bwd_tflops: float | None = None  # useful backward FLOPs / (fwd+bwd time - fwd time)
    note: str = ""
    # device time per call of the pass `speedup` compares (fwd+bwd where measured, else fwd),
    # replayed from a CUDA graph with the L2 warm (bench/timing.py); None on CPU or where the call
    # cannot be captured
    graph_ms: float | None = None
    graph_speedup: float | None = None  # baseline graph_ms / this graph_ms
    # where `bw_frac` counts a schedule's traffic (BenchCase.min_bytes): the minimal traffic's
    # fraction of copy bandwidth (inputs read once, outputs written once)
    min_bw_frac: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def grad_outputs(out) -> list[torch.Tensor]:
    """The tensors of a call's output that carry a gradient (a tuple of outputs is taken whole:
    q_rot and k_rot of RoPE, not their sum)."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Every tensor in the case's arguments, lists of crops included."""
    return [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]


def _leaves(args: tuple, kwargs: dict, parameters: list[torch.Tensor] = ()) -> list[torch.Tensor]:
    """What a backward writes `.grad` of: the inputs that require it, and the case's parameters."""
    return [t for t in _tensors(args, kwargs) if t.requires_grad] + list(parameters)


def _clear_grads(leaves: list[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def fwd_bwd_step(impl: Callable, args: tuple, kwargs: dict,
                 parameters: list[torch.Tensor] = ()) -> Callable[[], None]:
    """One forward + backward of impl(*args, **kwargs), clearing the gradients of the inputs and of
    `parameters` first (so every call allocates them afresh rather than accumulating into the last
    call's). Every output with a gradient is back-propagated: a scalar with 1, others with a fixed
    random upstream gradient drawn on the first call (so a measured call draws nothing)."""
    leaves = _leaves(args, kwargs, parameters)
    grad_outs: list[torch.Tensor] | None = None

    def step():
        nonlocal grad_outs
        _clear_grads(leaves)
        outs = grad_outputs(impl(*args, **kwargs))
        if grad_outs is None:
            grad_outs = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs]
        torch.autograd.backward(outs, grad_outs)

    return step


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def run_case(case: BenchCase, device: torch.device, roofline: Roofline | None,
             min_run_time: float = 0.5) -> list[BenchRow]:
    # The compiled references of an op share one code object, so across presets they would run
    # into dynamo's recompile limit (8) and silently time eager code under the compiled label.
    torch.compiler.reset()
    args, kwargs = case.make_inputs(device)
    parameters = case.parameters(device) if case.parameters is not None else []
    leaves = _leaves(args, kwargs, parameters) if case.backward else []
    has_grad = bool(leaves)
    grad_bytes = sum(t.numel() * t.element_size() for t in leaves)  # what each fwd+bwd run keeps
    clear_grads = functools.partial(_clear_grads, leaves)
    half = has_half_inputs(args, kwargs)
    rows: list[BenchRow] = []
    for name, impl in case.impls.items():
        fwd = (lambda impl=impl: impl(*args, **kwargs))
        label = f"{case.op}/{case.preset}/{name}"
        with torch.no_grad():
            fwd_s = median_seconds(fwd, device, min_run_time)
        fwd_bwd_s = None
        if has_grad:
            step = fwd_bwd_step(impl, args, kwargs, parameters)
            fwd_bwd_s = median_seconds(step, device, min_run_time)
            graph_s = graph_median_seconds(step, device, min_run_time, label=f"{label} fwd+bwd")
        else:
            with torch.no_grad():
                graph_s = graph_median_seconds(fwd, device, min_run_time, label=f"{label} fwd")
        # the timed step again (its upstream gradients already drawn), the last run's gradients
        # freed before the measured run, not inside it
        peak = peak_extra_bytes(step if has_grad else fwd, device, floor=grad_bytes, setup=clear_grads)
        rows.append(_row(case, name, roofline, half, fwd_s, fwd_bwd_s, peak, graph_s))
    base = rows[0]
    for row in rows:
        row.speedup = (base.fwd_bwd_ms or base.fwd_ms) / (row.fwd_bwd_ms or row.fwd_ms)
        row.graph_speedup = base.graph_ms / row.graph_ms if base.graph_ms and row.graph_ms else None
        row.mem_ratio = base.peak_mb / row.peak_mb if base.peak_mb and row.peak_mb else None
    del args, kwargs
    return rows


def has_half_inputs(args: tuple, kwargs: dict) -> bool:
    """Whether a case's inputs are bf16 / fp16: its matmuls are then judged against the bf16 rate."""
    return any(t.dtype in (torch.bfloat16, torch.float16) for t in _tensors(args, kwargs))


def rates(case: BenchCase, impl: str, half_inputs: bool, fwd_s: float, fwd_bwd_s: float | None,
          roofline: Roofline | None) -> dict[str, float | None]:
    """The rate columns of one impl's row (BenchRow's tflops, flops_frac, gbps, bw_frac, min_bw_frac,
    bwd_tflops) from its forward and forward+backward seconds. The matmul peak is the bf16 rate for
    half inputs, unless the impl computes in fp32 whatever its inputs (`case.fp32_impls`).
    tools/benchmarks_md.py re-derives committed rows with it, so every run uses today's counts."""
    flops = case.impl_flops.get(impl, case.flops)
    tflops = flops / fwd_s / 1e12 if flops else None
    gbps = case.bytes / fwd_s / 1e9 if case.bytes else None
    flops_frac = bw_frac = min_bw_frac = None
    if roofline is not None:
        bf16_math = half_inputs and impl not in case.fp32_impls
        peak_flops = roofline.bf16_flops_per_s if bf16_math else roofline.fp32_flops_per_s
        flops_frac = tflops * 1e12 / peak_flops if tflops else None
        bw_frac = gbps * 1e9 / roofline.copy_bytes_per_s if gbps else None
        min_bw_frac = case.min_bytes / fwd_s / roofline.copy_bytes_per_s if case.min_bytes else None
    bwd_tflops = None
    if case.bwd_flops and fwd_bwd_s and fwd_bwd_s > fwd_s:
        bwd_tflops = case.bwd_flops / (fwd_bwd_s - fwd_s) / 1e12
    return dict(tflops=tflops, flops_frac=flops_frac, gbps=gbps, bw_frac=bw_frac, min_bw_frac=min_bw_frac,
                bwd_tflops=bwd_tflops)


def _row(case: BenchCase, impl: str, roofline: Roofline | None, half: bool, fwd_s: float,
         fwd_bwd_s: float | None, peak: int | None, graph_s: float | None) -> BenchRow:
    """One impl's row, ratios to the baseline left for the caller. Roofline figures come from the
    L2-flushed event times: the graph replays keep small inputs in the L2, which would put
    bandwidth above the card's copy rate."""
    return BenchRow(case.op, case.preset, impl, fwd_s * 1e3, _ms(fwd_bwd_s), None if peak is None else peak / 2**20,
                    None, None, note=case.note, graph_ms=_ms(graph_s),
                    **rates(case, impl, half, fwd_s, fwd_bwd_s, roofline))


def run_cases(cases: Iterable[BenchCase], device: torch.device, roofline: Roofline | None,
              min_run_time: float = 0.5,
              on_case: Callable[[list[BenchRow], list[str]], None] | None = None) -> tuple[list[BenchRow], list[str]]:
    """Every case in turn: (rows, failures). A case that raises (an out-of-memory, a kernel that
    fails to launch) is one failure, "op/preset: Error: message", and the run goes on to the next
    case: one GPU session measures every other case. `on_case(rows, failures)` after each (e.g. to
    save partial results, so a run stopped by a time limit keeps what it measured)."""
    cases = list(cases)
    rows: list[BenchRow] = []
    failures: list[str] = []
    for case in tqdm(cases, desc="bench", unit="case", leave=False):
        try:
            rows.extend(run_case(case, device, roofline, min_run_time))
        except Exception as exc:  # noqa: BLE001 - reported as the case's failure, the run goes on
            message = str(exc).splitlines()[0] if str(exc) else ""
            failures.append(f"{case.op}/{case.preset}: {type(exc).__name__}: {message}"[:500])
        if on_case is not None:  # first: after a sticky CUDA error empty_cache raises too
            on_case(rows, failures)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, failures


def flop_rate_unit(tflops: Iterable[float | None]) -> tuple[str, float]:
    """The FLOP-rate unit a table prints its rates in, and its multiplier from TFLOP/s: GFLOP/s
    when every rate is below 1 TFLOP/s (a CPU's, or a tiny case's), where TFLOP/s to two decimals
    would print them as 0."""
    return ("GFLOP/s", 1e3) if all(v is None or v < 1 for v in tflops) else ("TFLOP/s", 1.0)


def gbps_text(gbps: float | None) -> str:
    """A GB/s figure: two decimals below 10 GB/s (a CPU's 0.3 GB/s is not 0), whole numbers above."""
    return "-" if gbps is None else format(gbps, ".2f" if gbps < 10 else ".0f")


def format_table(rows: list[BenchRow]) -> str:
    """Fixed-width text table, one line per (op, preset, impl); the CUDA-graph columns (device time
    of the compared pass and its ratio to the baseline) only when some row has them."""
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    graphs = any(r.graph_ms is not None for r in rows)
    rate, scale = flop_rate_unit(r.tflops for r in rows)
    header = f"{'op':<20}{'preset':<24}{'impl':<22}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>10}" \
             f"{'speedup':>9}{'mem x':>8}{rate:>9}{'%peak':>7}{'GB/s':>8}{'%bw':>6}" \
             + (f"{'graph ms':>10}{'graph x':>9}" if graphs else "")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.op:<20}{r.preset:<24}{r.impl:<22}{f(r.fwd_ms, '.3f'):>10}{f(r.fwd_bwd_ms, '.3f'):>12}"
            f"{f(r.peak_mb, '.1f'):>10}{f(r.speedup, '.2f'):>9}{f(r.mem_ratio, '.1f'):>8}"
            f"{f(r.tflops and scale * r.tflops, '.2f'):>9}{f(r.flops_frac and 100 * r.flops_frac, '.0f'):>7}"
            f"{gbps_text(r.gbps):>8}{f(r.bw_frac and 100 * r.bw_frac, '.0f'):>6}"
            + (f"{f(r.graph_ms, '.3f'):>10}{f(r.graph_speedup, '.2f'):>9}" if graphs else ""))
    return "\n".join(lines)
