"""Device sweep of the fused RoPE attention's schedules, forward and backward (GPU; ~90 s on an H100).

What it measures, per shape, bf16:
- forward: the launcher alone (`rope_attention_fwd_triton`: with `prerotate`, the q/k rotation
  kernel, then the attention kernel) for each forward candidate below, and as the bar torch SDPA's
  forward (cuDNN and flash forced in turn) on the pre-rotated q, k and v;
- backward: the launcher alone (`rope_attention_bwd_triton`: the delta kernel, the optional q/k
  pre-rotation, the dk/dv and dq kernels), with the forward's outputs precomputed, for each
  backward candidate, and as the bar SDPA's backward on the pre-rotated q, k and v as the SDPA
  route holds them (the route's rotation and its transpose are not in that time).
Shapes: ViT-L N=261 (Dh=64, the 224-px global crops that dominate the trainer's attention time),
ViT-7B N=4101 (Dh=128) and ViT-L N=1029 (Dh=64). Each time is the median of >= 20 calls: CUDA
events around each call, the L2 flushed before it and the device drained after the flush, after a
warm-up (the first call compiles).

How to read it: `tflops` counts the forward as 4 B H N^2 Dh and the backward as 2.5x that (as
dinov3_fast/bench/cases/attention.py does), so the kernels' recomputation does not count; an
H100's measured bf16 rate is ~716. `rel_diff` is the largest |result - default's result| over the
largest |default's result| of the same pass (out for the forward, dqkv for the backward; SDPA's dq
and dk taken back through the transposed rotation): schedules differ in summation order only, so
anything above TOL (`ok` false) is a wrong kernel, whatever its speed. A schedule's ms against its
pass's `default` is its speed-up; against `sdpa:cudnn` whether it could replace the SDPA route
(ops/attention SDPA_ROUTE_MIN_TOKENS).
Candidates run in priority order; past --budget-s the rest are listed under `skipped`, and the
JSON is rewritten after every row, so a kill keeps what was measured.

    python benchmarks/attention_sweep.py --json $OUT/attn_sweep.json
    python benchmarks/attention_sweep.py --dry-run --json /tmp/sweep.json   # CPU, interpreter

Without a GPU (and without --dry-run) it prints one line and exits 0. --dry-run runs a tiny fp32
shape under the Triton interpreter (every candidate, the checks and the JSON; times meaningless).
Registers, spills and wgmma of every candidate: `python tools/aot_compile.py --attention-sweep`.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOL = 2e-2  # rel_diff above this flags a wrong schedule (bf16 reorderings stay near 1e-3)
PREFIX = 5  # cls + 4 storage tokens


def verdict(row: dict) -> str:
    """rel_diff against the default's result, and WRONG above TOL; "no reference" when the default failed."""
    if row["ok"] is None:
        return "rel_diff -: no reference (the default did not run)"
    return f"rel_diff {row['rel_diff']:.1e}" + ("" if row["ok"] else "  WRONG")


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


SHAPES = (Shape("vitl_261tok", 32, 16, 261, 64), Shape("vit7b_4101tok", 4, 32, 4101, 128),
          Shape("vitl_1029tok", 16, 16, 1029, 64))
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

def median_ms(fn, device, reps: int) -> float:
    """Median ms of fn over `reps` calls, fn having run once (compiled). CUDA: two warm-up calls,
    then events around each call, the L2 flushed before it and the device drained after the
    flush (no launch hides behind it)."""
    import torch

    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)  # several times an H100's 50 MiB L2
    for _ in range(2):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


# ----------------------------------------------------------------------------- one shape

class ShapeRun:
    """Inputs and forward outputs at one shape, and per pass the result the others are compared
    with (that pass's first candidate's, `default`)."""

    def __init__(self, s: Shape, device, dtype):
        import torch

        from dinov3_fast.bench.cases.attention import rope_tables
        from dinov3_fast.ops.attention import triton as attn_triton

        self.s, self.ops = s, attn_triton
        gen = torch.Generator(device).manual_seed(0)
        T, C = s.B * s.N, s.H * s.Dh
        self.qkv = torch.randn(T, 3 * C, device=device, dtype=dtype, generator=gen)
        self.dout = torch.randn(T, C, device=device, dtype=dtype, generator=gen)
        self.sin, self.cos = rope_tables(s.N - PREFIX, s.Dh, device)
        self.out, self.lse = attn_triton.rope_attention_fwd_triton(self.qkv, self.sin, self.cos, None, s.H, s.N)
        self.ref = {"fwd": None, "bwd": None}

    def call(self, cand: Candidate):
        """The candidate's result: out [T, C] (forward) or dqkv [T, 3C] (backward)."""
        s = self.s
        if cand.direction == "fwd":
            return self.ops.rope_attention_fwd_triton(self.qkv, self.sin, self.cos, None, s.H, s.N, **cand.kwargs)[0]
        return self.ops.rope_attention_bwd_triton(self.dout, self.qkv, self.out, self.lse, self.sin, self.cos,
                                                  None, s.H, s.N, **cand.kwargs)

    def rel_diff(self, result, direction: str, is_default: bool) -> float | None:
        """Largest |result - default's| over the largest |default's| of the pass; the default's own
        row sets the reference (0.0); None when the default did not run, so nothing is compared
        against another candidate."""
        import torch

        if is_default:
            self.ref[direction] = result
        ref = self.ref[direction]
        if ref is None:
            return None
        if not torch.isfinite(result).all():
            return float("inf")
        return ((result.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()

    def sdpa(self, backend: str, direction: str):
        """(callable timing SDPA's pass on the rotated q, k and v; its out [T, C], or its dqkv
        [T, 3C] with dq and dk rotated back)."""
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        s = self.s
        q, k, v = self.qkv.view(s.B, s.N, 3, s.H, s.Dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, Dh] views
        q, k = self.ops.apply_rope_triton(q, k, self.sin, self.cos, transpose=False)
        q, k, v = (t.detach().requires_grad_(direction == "bwd") for t in (q, k, v))
        forced = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
        if direction == "fwd":
            def step():
                with sdpa_kernel(forced):
                    return F.scaled_dot_product_attention(q, k, v)

            return step, step().transpose(1, 2).reshape(s.B * s.N, -1)
        with sdpa_kernel(forced):
            o = F.scaled_dot_product_attention(q, k, v)
        do = self.dout.view(s.B, s.N, s.H, s.Dh).transpose(1, 2)

        def step():
            return torch.autograd.grad(o, (q, k, v), do, retain_graph=True)

        dq, dk, dv = step()
        dq, dk = self.ops.apply_rope_triton(dq, dk, self.sin, self.cos, transpose=True)
        dqkv = torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(s.B * s.N, -1)  # [B, N, 3, H, Dh]
        return step, dqkv


# ----------------------------------------------------------------------------- driver

def environment(dry_run: bool) -> dict:
    import torch
    import triton

    return {"card": torch.cuda.get_device_name() if not dry_run else "cpu (interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "git": os.environ.get("GIT_REV"),
            "dry_run": dry_run, "tol": TOL, "flops": "fwd 4 B H N^2 Dh, bwd 2.5x"}


def entries(head_dim: int) -> list[tuple[str, object]]:
    """A shape's rows in order: each pass's candidates, then its SDPA bars."""
    rows = []
    for direction in ("fwd", "bwd"):
        rows += [(c.label, c) for c in candidates_for(head_dim) if c.direction == direction]
        rows += [(f"{direction}:sdpa:{b}", (direction, b)) for b in SDPA_BACKENDS]
    return rows


def sweep(shapes, device, dtype, reps: int, budget_s: float, json_path: Path | None, progress=None) -> dict:
    """Every shape's candidates and SDPA bars, in order, until budget_s; the report."""
    import torch

    t0 = time.perf_counter()
    report = {**environment(device.type != "cuda"), "budget_s": budget_s, "rows": [], "skipped": []}

    def save():
        report["elapsed_s"] = round(time.perf_counter() - t0, 1)
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
                if isinstance(what, Candidate):
                    step, result = functools.partial(run.call, what), run.call(what)  # the first call compiles
                elif device.type == "cuda" or what[1] == "flash":  # the CPU has no cuDNN
                    step, result = run.sdpa(what[1], direction)
                else:
                    raise RuntimeError("no cuDNN on the CPU")
                ms = median_ms(step, device, reps)
                diff = run.rel_diff(result, direction, is_default=name.endswith(":default"))
                row.update(ms=round(ms, 4), tflops=round(flops(s, direction) / ms / 1e9, 1), rel_diff=diff,
                           ok=None if diff is None else diff <= TOL)
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
    wrong = [r for r in report["rows"] if r.get("ok") is False]
    print(f"{len(report['rows'])} rows in {report['elapsed_s']} s, {len(wrong)} flagged wrong, "
          f"{len(report['skipped'])} skipped for time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
