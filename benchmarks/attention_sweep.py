"""Device sweep of the fused RoPE attention's schedules, forward and backward (GPU; ~90 s on an H100).

What it measures, per shape, bf16:
- forward: the launcher alone (`rope_attention_fwd_triton`: with `prerotate`, the q/k rotation
  kernel, then the attention kernel) for each forward candidate below, and as the bar torch SDPA's
  forward (cuDNN and flash forced in turn) on the pre-rotated q, k and v;
- backward: the launcher alone (`rope_attention_bwd_triton`: the delta kernel, the optional q/k
  pre-rotation, the dk/dv and dq kernels), with the forward's outputs precomputed, for each
  backward candidate, and as the bar SDPA's backward on the pre-rotated q, k and v as the SDPA
  route holds them (the route's rotation and its transpose are not in that time);
- the route itself, each pass (`fwd:route`, `bwd:route`): `_rope_then_sdpa` as training calls it,
  the fused rotation, SDPA by torch's own backend choice and the layout copies, backward through
  autograd: what a step pays at a length routed to SDPA.
Shapes: ViT-L N=261 and N=54 (Dh=64: DINOv3's 256 / 112 px global and local crops, near the
vitl16_h100 trainer's 224 / 96 px, N = 201 / 41, whose local crops carry 45% of its attention
tokens), ViT-7B N=4101 (Dh=128) and ViT-L N=1029 (Dh=64). Each time is a median of >= 20 calls after a
warm-up (the first call compiles), CUDA events around each call, the L2 flushed before it and the
device drained after the flush: `ms`, the device time, with the launches hidden behind a sleep
kernel queued before the start event (what a training step, whose host runs ahead, pays), and
`wall_ms` without it (the host's launch time counts: at N=261 most of it).

How to read it: `tflops` (of `ms`) counts the forward as 4 B H N^2 Dh and the backward as 2.5x
that (as dinov3_fast/bench/cases/attention.py does), so the kernels' recomputation does not count;
an H100's measured bf16 rate is ~716. `rel_diff` is the largest |result - default's result| over
the largest |default's result| of the same pass (out and lse for the forward, dqkv for the
backward; SDPA's dq and dk taken back through the transposed rotation), on inputs other than the
timed ones (see ShapeRun: an unwritten output element cannot read back as right); forward
candidates must also give exactly out = 1 and lse = ln N on a probe with q = 0, v = 1
(`probe_ok`), which catches an unmasked padded key at any N. Schedules differ in summation order
only, so anything above TOL or a failed probe (`ok` false) is a wrong kernel, whatever its speed.
A schedule's ms against its pass's `default` is its speed-up. The report's `decision` (printed
last) applies the rule docs/architecture.md fixed before any sweep ran ("The img/s goal and the
attention at the trainer's crops"): per shape, the fastest correct forward plus backward
schedules against the route's two passes; where the route is faster, training calls at that
length belong on it (ops/attention SDPA_ROUTE_MIN_TOKENS), elsewhere the fastest schedules
become the defaults.
Per shape, both passes' default and route run first (the decision's minimum), then each pass's
other candidates in priority order and its SDPA bars; past --budget-s the rest are listed under
`skipped` (the decision is then marked `partial`), and the JSON (with its `decision`) is
rewritten after every row, so a kill keeps what was measured.

    python benchmarks/attention_sweep.py --json $OUT/attn_sweep.json
    python benchmarks/attention_sweep.py --dry-run --json /tmp/sweep.json   # CPU, interpreter

Without a GPU (and without --dry-run) it prints one line and exits 0. --dry-run runs a tiny fp32
shape under the Triton interpreter (every candidate, the checks and the JSON; times meaningless).
Registers, spills, wgmma and SASS tensor-core instruction shapes of every candidate: `python
tools/aot_compile.py --attention-sweep`.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The device runs this file by path from a bare checkout (no installed package): dinov3_fast,
# imported lazily below (after --dry-run sets TRITON_INTERPRET), comes from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOL = 2e-2  # rel_diff above this flags a wrong schedule (bf16 reorderings stay near 1e-3)
PREFIX = 5  # cls + 4 storage tokens


PROBE_TEXT = {None: "", True: ", probe exact", False: ", probe FAILED"}  # by row["probe_ok"]
PARTIAL_TEXT = " (partial: candidates skipped)"  # after a decision whose shape lost rows to the budget


def verdict(row: dict) -> str:
    """rel_diff against the default's result, the forward's probe, and WRONG if either fails;
    "no reference" when the default failed."""
    probe = PROBE_TEXT[row.get("probe_ok")]
    if row["ok"] is None:
        return f"rel_diff -: no reference (the default did not run){probe}"
    return f"rel_diff {row['rel_diff']:.1e}{probe}" + ("" if row["ok"] else "  WRONG")


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    H: int
    N: int
    Dh: int


@dataclass(frozen=True)
class Candidate:
    """One schedule of one pass: rope_attention_fwd_triton's (config, prerotate), or
    rope_attention_bwd_triton's (config, dq_config, prerotate)."""
    direction: str  # "fwd" | "bwd"
    name: str
    config: dict | None = None
    dq_config: dict | None = None
    prerotate: bool = False
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.direction}:{self.name}"

    @property
    def kwargs(self) -> dict:
        extra = dict(dq_config=self.dq_config) if self.direction == "bwd" else {}
        return dict(config=self.config, prerotate=self.prerotate, **extra)


def fwd(name: str, config: dict | None = None, prerotate: bool = False, note: str = "") -> Candidate:
    return Candidate("fwd", name, config, None, prerotate, note)


def bwd(name: str, config: dict | None = None, dq_config: dict | None = None, prerotate: bool = False,
        note: str = "") -> Candidate:
    return Candidate("bwd", name, config, dq_config, prerotate, note)


def fwd_tiles(block_m: int, block_n: int, warps: int = 8, stages: int = 3) -> dict:
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def tiles(block: int, inner: int, warps: int = 8, stages: int = 2) -> dict:
    return dict(BLOCK=block, BLOCK_INNER=inner, num_warps=warps, num_stages=stages)


SHAPES = (Shape("vitl_261tok", 32, 16, 261, 64), Shape("vitl_54tok", 128, 16, 54, 64),
          Shape("vit7b_4101tok", 4, 32, 4101, 128), Shape("vitl_1029tok", 16, 16, 1029, 64))
DRY_RUN_SHAPES = (Shape("dry_run_37tok", 2, 2, 37, 32),)
# Per head dim, in priority order, the forward's first; sm_90 registers/spills from
# tools/aot_compile.py --attention-sweep (triton 3.9, with the JIT's specialisation): none spills
# except where the note says so.
CANDIDATES = {
    128: (
        fwd("default", note="fwd_config: 128/32, 8 warps, rotation in the loop; 165 regs, 144 KiB smem"),
        fwd("prerot", prerotate=True, note="fwd_config's tiles; 128 regs, 80 KiB smem"),
        fwd("prerot_128x64", fwd_tiles(128, 64), True, "178 regs, 128 KiB smem"),
        fwd("prerot_128x128", fwd_tiles(128, 128, stages=2), True, "251 regs, 160 KiB smem"),
        fwd("prerot_64x64_w4", fwd_tiles(64, 64, warps=4), True, "182 regs, 112 KiB smem"),
        bwd("default", note="bwd_config: one kernel 64/32, rotation in the loops; 254 regs"),
        bwd("prerot", tiles(64, 32), prerotate=True, note="240 regs"),
        bwd("prerot_64x64", tiles(64, 64), prerotate=True, note="251 regs"),
        bwd("prerot_split_64x64_128x64", tiles(64, 64), tiles(128, 64), True, "dkdv 248 regs, dq 238"),
        bwd("prerot_split_64x32_128x64", tiles(64, 32), tiles(128, 64), True, "dkdv 177 regs, dq 238"),
        bwd("prerot_split_128x32_128x32", tiles(128, 32), tiles(128, 32), True,
            "FA2/tutorial layout; dkdv spills 192 B (255 regs), dq 242"),
        bwd("split_64x32_128x32", tiles(64, 32), tiles(128, 32), False, "no prerotation; dkdv 217 regs, dq 246"),
    ),
    64: (
        fwd("default", note="fwd_config by N, rotation in the loop: to N=512 64/32 w4, 125 regs, 64 KiB smem; "
            "beyond, 128/64 w8, 127 regs, 128 KiB"),
        fwd("prerot", prerotate=True, note="fwd_config's tiles; at N=261 82 regs, 32 KiB smem"),
        fwd("prerot_128x64", fwd_tiles(128, 64), True, "120 regs, 64 KiB smem"),
        fwd("prerot_64x64_w4", fwd_tiles(64, 64, warps=4), True, "128 regs, 56 KiB smem"),
        fwd("prerot_128x128", fwd_tiles(128, 128), True, "178 regs, 112 KiB smem"),
        bwd("default", note="bwd_config: one kernel 64/32, rotation in the loops; 162 regs"),
        bwd("prerot_64x64_w4", tiles(64, 64, warps=4), prerotate=True,
            note="one warpgroup per 64-row tile: no n=16 wgmma (64x64x16 and 64x32x16); 250 regs, 49 KiB smem; "
                 "N=54 fits one tile"),
        bwd("prerot_128x64", tiles(128, 64), prerotate=True, note="240 regs"),
        bwd("prerot_split_128x64_128x64", tiles(128, 64), tiles(128, 64), True, "dkdv 218 regs, dq 127"),
        bwd("prerot_128x32", tiles(128, 32), prerotate=True, note="234 regs"),
        bwd("128x64", tiles(128, 64), note="rotation in the loops; 246 regs"),
        bwd("prerot_split_128x64_128x64_s3", tiles(128, 64, stages=3), tiles(128, 64, stages=3), True,
            "dkdv 246 regs, dq 127"),
    ),
}
SDPA_BACKENDS = ("cudnn", "flash")


def candidates_for(head_dim: int) -> tuple[Candidate, ...]:
    """The candidates at a head dim (the Dh=64 list below 64: the dry run's Dh=32)."""
    return CANDIDATES[128 if head_dim > 64 else 64]


def flops(s: Shape, direction: str) -> float:
    """The pass's counted FLOPs: 4 B H N^2 Dh forward, 2.5x that backward."""
    return (2.5 if direction == "bwd" else 1.0) * 4 * s.B * s.H * s.N * s.N * s.Dh


# ----------------------------------------------------------------------------- timing

SLEEP_CYCLES = 2_000_000  # ~1 ms on an H100: longer than any candidate's host launch time


def median_ms(fn, device, reps: int) -> tuple[float, float]:
    """(device ms, wall ms): medians over `reps` calls each, fn having run once (compiled). CUDA:
    two warm-up calls, the L2 flushed before every call and the device drained after the flush;
    wall: events around the call with the GPU idle at the start event, so the host's launch time
    counts, as a caller waiting for the call sees it; device: the same with a ~1 ms sleep kernel
    queued before the start event, which the launches hide behind, so only the kernels' own time
    counts (what a training step, whose host runs ahead, pays). CPU: wall time, twice."""
    import torch

    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), statistics.median(times)
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)  # several times an H100's 50 MiB L2
    for _ in range(2):
        fn()
    medians = []
    for hide_launches in (True, False):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            flush.zero_()
            torch.cuda.synchronize()
            if hide_launches:
                torch.cuda._sleep(SLEEP_CYCLES)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        medians.append(statistics.median(s.elapsed_time(e) for s, e in events))
    return medians[0], medians[1]


# ----------------------------------------------------------------------------- one shape

@dataclass
class Inputs:
    """One draw of a shape's inputs, and the default forward's out and lse on them (what the
    backward reads)."""
    qkv: object
    dout: object
    sin: object
    cos: object
    out: object = None
    lse: object = None


class ShapeRun:
    """A shape's inputs and, per pass, the result the others are compared with (that pass's first
    candidate's, `default`). Results are checked on their own draw (`checked`), never on the one
    the timing loop runs (`timed`): a buffer freed by a timed call, which the caching allocator
    may hand to the next candidate's output, then holds numbers for other inputs, so an output
    element a candidate fails to write cannot read back as right; and every checked result but
    the reference is filled with NaN before it is freed. A forward is also run on a `probe` draw
    (q = 0, v = 1): every score is exactly 0, so a right kernel's out is exactly 1 and its lse
    exactly ln N; a padded key that is not masked out, or a wrong normaliser, moves both at any N,
    where against the default it would hide in bf16 rounding at long N."""

    def __init__(self, s: Shape, device, dtype):
        from dinov3_fast.ops.attention import triton as attn_triton

        self.s, self.ops = s, attn_triton
        self.timed, self.checked = (self._draw(seed, device, dtype) for seed in (0, 1))
        C = s.H * s.Dh
        self.probe = Inputs(self.checked.qkv.clone(), None, self.checked.sin, self.checked.cos)
        self.probe.qkv[:, :C] = 0
        self.probe.qkv[:, 2 * C:] = 1
        self.ref = {"fwd": None, "bwd": None}

    def _draw(self, seed: int, device, dtype) -> Inputs:
        import torch

        from dinov3_fast.bench.cases.attention import rope_tables

        s = self.s
        gen = torch.Generator(device).manual_seed(seed)
        T, C = s.B * s.N, s.H * s.Dh
        x = Inputs(torch.randn(T, 3 * C, device=device, dtype=dtype, generator=gen),
                   torch.randn(T, C, device=device, dtype=dtype, generator=gen), *rope_tables(s.N - PREFIX, s.Dh, device))
        x.out, x.lse = self.ops.rope_attention_fwd_triton(x.qkv, x.sin, x.cos, None, s.H, s.N)
        return x

    def call(self, cand: Candidate, x: Inputs) -> tuple:
        """The candidate's results on x: (out [T, C], lse [H, T]) forward, (dqkv [T, 3C],) backward."""
        s = self.s
        if cand.direction == "fwd":
            return self.ops.rope_attention_fwd_triton(x.qkv, x.sin, x.cos, None, s.H, s.N, **cand.kwargs)
        return (self.ops.rope_attention_bwd_triton(x.dout, x.qkv, x.out, x.lse, x.sin, x.cos, None, s.H, s.N,
                                                   **cand.kwargs),)

    def probe_ok(self, cand: Candidate) -> bool:
        """Whether a forward candidate's out is exactly 1 and its lse ln N (fp32 rounding) on `probe`."""
        out, lse = self.call(cand, self.probe)
        ln_n = math.log(self.s.N)
        ok = bool((out == 1).all()) and bool(((lse - ln_n).abs() <= 1e-5 * ln_n).all())
        out.fill_(float("nan"))
        return ok

    def rel_diff(self, results: tuple, direction: str, is_default: bool) -> float | None:
        """Largest |result - default's| over the largest |default's| of the pass, over each result
        (out and lse forward, dqkv backward; SDPA's forward has no lse: out alone); the default's
        own row sets the reference (0.0); None when the default did not run, so nothing is
        compared against another candidate. Results other than the reference are then poisoned."""
        import torch

        if is_default:
            self.ref[direction] = results
        ref = self.ref[direction]
        if ref is None:
            return None
        diffs = [float("inf") if not torch.isfinite(got).all() else
                 ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()
                 for got, want in zip(results, ref)]
        if not is_default:
            for got in results:
                got.fill_(float("nan"))
        return max(diffs)

    def sdpa(self, backend: str, direction: str, x: Inputs):
        """(callable timing SDPA's pass on x's rotated q, k and v; its results on x: (out [T, C],)
        forward, (dqkv [T, 3C],) backward with dq and dk rotated back)."""
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        s = self.s
        q, k, v = x.qkv.view(s.B, s.N, 3, s.H, s.Dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, Dh] views
        q, k = self.ops.apply_rope_triton(q, k, x.sin, x.cos, transpose=False)
        q, k, v = (t.detach().requires_grad_(direction == "bwd") for t in (q, k, v))
        forced = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
        if direction == "fwd":
            def step():
                with sdpa_kernel(forced):
                    return F.scaled_dot_product_attention(q, k, v)

            return step, (step().transpose(1, 2).reshape(s.B * s.N, -1),)
        with sdpa_kernel(forced):
            o = F.scaled_dot_product_attention(q, k, v)
        do = x.dout.view(s.B, s.N, s.H, s.Dh).transpose(1, 2)

        def step():
            return torch.autograd.grad(o, (q, k, v), do, retain_graph=True)

        dq, dk, dv = step()
        dq, dk = self.ops.apply_rope_triton(dq, dk, x.sin, x.cos, transpose=True)
        return step, (torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(s.B * s.N, -1),)  # [B, N, 3, H, Dh]

    def route(self, direction: str, x: Inputs):
        """(callable timing the long-sequence route of training calls, `_rope_then_sdpa`, on x: the
        fused rotation of q and k, torch's SDPA by its own backend choice and the layout copies,
        forward with qkv requiring grad, or backward through autograd; its results on x as the
        candidates give them: (out [T, C],) forward, (dqkv [T, 3C],) backward). What a training
        step pays at a length routed to SDPA, the number the fused schedules must beat there."""
        import torch

        from dinov3_fast.ops.attention import _rope_then_sdpa

        s = self.s
        qkv = x.qkv.view(s.B, s.N, -1).detach().requires_grad_()
        if direction == "fwd":
            def step():
                return _rope_then_sdpa(qkv, x.sin, x.cos, s.H)

            return step, (step().detach().view(s.B * s.N, -1),)
        out = _rope_then_sdpa(qkv, x.sin, x.cos, s.H)
        dout = x.dout.view(s.B, s.N, -1)

        def step():
            return torch.autograd.grad(out, qkv, dout, retain_graph=True)

        return step, (step()[0].view(s.B * s.N, -1),)


# ----------------------------------------------------------------------------- driver

def environment(dry_run: bool) -> dict:
    import torch
    import triton

    return {"card": torch.cuda.get_device_name() if not dry_run else "cpu (interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "git": os.environ.get("GIT_REV"),
            "dry_run": dry_run, "tol": TOL, "flops": "fwd 4 B H N^2 Dh, bwd 2.5x"}


def entries(head_dim: int) -> list[tuple[str, object]]:
    """A shape's rows in order: both passes' default schedule and SDPA route first (what the route
    decision needs, should the budget run out), then per pass the other candidates and the SDPA
    bars."""
    first, rest = [], []
    for direction in ("fwd", "bwd"):
        default, *others = [(c.label, c) for c in candidates_for(head_dim) if c.direction == direction]
        first += [default, (f"{direction}:route", (direction, "route"))]
        rest += others + [(f"{direction}:sdpa:{b}", (direction, b)) for b in SDPA_BACKENDS]
    return first + rest


def sweep(shapes, device, dtype, reps: int, budget_s: float, json_path: Path | None, progress=None) -> dict:
    """Every shape's candidates and SDPA bars, in order, until budget_s; the report."""
    import torch

    t0 = time.perf_counter()
    report = {**environment(device.type != "cuda"), "budget_s": budget_s, "rows": [], "skipped": []}

    def save():
        report["elapsed_s"] = round(time.perf_counter() - t0, 1)
        report["decision"] = route_decision(report["rows"], report["skipped"])
        if json_path is not None:  # whole files only: a kill mid-write leaves the .tmp
            tmp = json_path.with_name(json_path.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=1))
            tmp.replace(json_path)

    for s in shapes:
        run = None
        for name, what in entries(s.Dh):
            if time.perf_counter() - t0 > budget_s:
                report["skipped"].append(f"{s.name} {name}")
                continue
            direction = name.split(":")[0]
            row = {"shape": s.name, "B": s.B, "H": s.H, "N": s.N, "Dh": s.Dh, "candidate": name}
            if isinstance(what, Candidate):
                row.update(config=what.config, dq_config=what.dq_config, prerotate=what.prerotate, note=what.note)
            try:
                run = run or ShapeRun(s, device, dtype)
                probe = None
                if isinstance(what, Candidate):
                    results = run.call(what, run.checked)  # the first call compiles
                    step = functools.partial(run.call, what, run.timed)
                    if direction == "fwd":
                        probe = run.probe_ok(what)
                elif what[1] == "route":
                    results = run.route(direction, run.checked)[1]
                    step = run.route(direction, run.timed)[0]
                elif device.type == "cuda" or what[1] == "flash":  # the CPU has no cuDNN
                    results = run.sdpa(what[1], direction, run.checked)[1]
                    step = run.sdpa(what[1], direction, run.timed)[0]
                else:
                    raise RuntimeError("no cuDNN on the CPU")
                diff = run.rel_diff(results, direction, is_default=name.endswith(":default"))
                del results
                ms, wall_ms = median_ms(step, device, reps)
                row.update(ms=round(ms, 4), wall_ms=round(wall_ms, 4), tflops=round(flops(s, direction) / ms / 1e9, 1),
                           rel_diff=diff, probe_ok=probe,
                           ok=None if diff is None else diff <= TOL and probe is not False)
            except Exception as exc:  # noqa: BLE001 - an unavailable backend or a failed launch is a row, not the end
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            report["rows"].append(row)
            save()
            line = (f"{s.name:<15}{name:<36}" + (f"{row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s  " + verdict(row)
                                                 if "ms" in row else f"  {row['error'][:90]}"))
            (progress.write if progress is not None else print)(line)
            if progress is not None:
                progress.update()
        del run
    save()
    return report


def route_decision(rows: list[dict], skipped: list[str]) -> dict:
    """Per shape, the rule fixed before the sweep ran (docs/architecture.md, "The img/s goal and
    the attention at the trainer's crops"): the fastest forward plus the fastest backward among
    our schedules against the SDPA route's forward plus backward, in device ms, rows within TOL
    of the default only (a wrong route does not count either). `faster` is "route" or "fused", or
    None when a pass is missing on either side (a failed row, or the budget ran out);
    `route_over_fused` is the time ratio; `partial` says some of the shape's candidates were
    skipped for time, so a faster schedule may not have been measured."""
    decision = {}
    for row in rows:
        entry = decision.setdefault(row["shape"], {"N": row["N"], "fused": {}, "route": {}})
        direction, _, kind = row["candidate"].partition(":")
        if "ms" not in row or kind.startswith("sdpa:") or not row["ok"]:
            continue
        if kind == "route":
            entry["route"][direction] = row["ms"]
        elif row["ms"] < entry["fused"].get(direction, (None, math.inf))[1]:
            entry["fused"][direction] = (kind, row["ms"])
    for shape, entry in decision.items():
        fused, route = entry.pop("fused"), entry.pop("route")
        entry["faster"] = None
        entry["partial"] = any(item.split(" ", 1)[0] == shape for item in skipped)
        if len(fused) == 2 and len(route) == 2:
            fused_ms, route_ms = fused["fwd"][1] + fused["bwd"][1], route["fwd"] + route["bwd"]
            entry.update(fused_fwd=fused["fwd"][0], fused_bwd=fused["bwd"][0], fused_ms=round(fused_ms, 4),
                         route_ms=round(route_ms, 4), route_over_fused=round(route_ms / fused_ms, 3),
                         faster="route" if route_ms < fused_ms else "fused")
    return decision


def table_lines(name: str, record: dict) -> list[str]:
    """Markdown of one saved sweep (tools/benchmarks_md.py puts it in BENCHMARKS.md): its
    provenance, the route decision per shape, then every row."""
    out = ["", f"### {name}", ""]
    if record.get("dry_run"):
        out += ["A dry run (CPU, Triton interpreter): its times say nothing about a GPU.", ""]
    out += [f"Card: {record['card']}; torch {record['torch']}; triton {record['triton']}; "
            f"code {record['git'][:7] if record.get('git') else 'git unknown'}; "
            f"{len(record['rows'])} rows in {record.get('elapsed_s')} s"
            + (f"; skipped for time: {', '.join(record['skipped'])}" if record["skipped"] else "") + ".", "",
            "| shape | N | fastest schedules (fwd + bwd) | fused ms | route ms | route / fused | faster |",
            "|---|---|---|---|---|---|---|"]
    for shape, d in record.get("decision", {}).items():
        partial = PARTIAL_TEXT if d.get("partial") else ""
        out.append(f"| {shape} | {d['N']} | " + ("- | - | - | - | no verdict (a pass is missing)" if d["faster"] is None
                   else f"{d['fused_fwd']} + {d['fused_bwd']} | {d['fused_ms']:.3f} | {d['route_ms']:.3f} | "
                   f"{d['route_over_fused']:.2f} | {d['faster']}") + f"{partial} |")
    out += ["", "| shape | candidate | ms | wall ms | TFLOP/s | rel_diff | check |", "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if "ms" not in r:
            error = r["error"].splitlines()[0][:80].replace("|", "\\|")  # compile errors span lines
            out.append(f"| {r['shape']} | {r['candidate']} | - | - | - | - | error: {error} |")
            continue
        check = {None: "no reference", True: "ok", False: "WRONG"}[r["ok"]] + PROBE_TEXT[r.get("probe_ok")]
        out.append(f"| {r['shape']} | {r['candidate']} | {r['ms']:.3f} | {r['wall_ms']:.3f} | {r['tflops']:.1f} | "
                   + ("- |" if r["rel_diff"] is None else f"{r['rel_diff']:.1e} |") + f" {check} |")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the report here (rewritten after every row)")
    parser.add_argument("--dry-run", action="store_true",
                        help="a tiny fp32 shape on the CPU under the Triton interpreter")
    parser.add_argument("--budget-s", type=float, default=45.0, help="start no candidate after this many seconds")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per candidate (median)")
    parser.add_argument("--shape", action="append", choices=[s.name for s in SHAPES], help="only these shapes")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    from tqdm import tqdm

    if not args.dry_run and not torch.cuda.is_available():
        print("attention_sweep: no CUDA GPU here, nothing measured (--dry-run runs a tiny shape on the CPU)")
        return 0
    if args.dry_run:
        shapes, device, dtype, reps = DRY_RUN_SHAPES, torch.device("cpu"), torch.float32, 1
    else:
        shapes = [s for s in SHAPES if not args.shape or s.name in args.shape]
        device, dtype, reps = torch.device("cuda"), torch.bfloat16, max(args.reps, 20)
    total = sum(len(entries(s.Dh)) for s in shapes)
    with tqdm(total=total, desc="attention sweep", file=sys.stderr, disable=None) as progress:
        report = sweep(shapes, device, dtype, reps, args.budget_s, args.json, progress)
    for shape, d in report["decision"].items():
        print(f"{shape:<15}N={d['N']:<5} " + ("no verdict: a pass is missing" if d["faster"] is None else
              f"fused {d['fused_ms']:.3f} ms (fwd:{d['fused_fwd']} + bwd:{d['fused_bwd']}), SDPA route "
              f"{d['route_ms']:.3f} ms: {d['faster']} is faster") + (PARTIAL_TEXT if d["partial"] else ""))
    wrong = [r for r in report["rows"] if r.get("ok") is False]
    measured = [r for r in report["rows"] if "ms" in r]
    print(f"{len(report['rows'])} rows in {report['elapsed_s']} s, {len(measured)} measured, {len(wrong)} flagged "
          f"wrong, {len(report['skipped'])} skipped for time")
    # Rows that all failed (every candidate and bar raised) are a broken sweep, not a slow one.
    return 1 if report["rows"] and not measured else 0


if __name__ == "__main__":
    sys.exit(main())
