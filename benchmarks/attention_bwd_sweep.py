"""Device sweep of the fused RoPE-attention backward's schedules (GPU; ~60 s on an H100).

What it measures: the backward launcher alone (`rope_attention_bwd_triton`: the delta kernel, the
optional q/k pre-rotation, the dk/dv and dq kernels), with the forward's outputs precomputed, for
each candidate schedule below, at ViT-7B N=4101 (Dh=128) and ViT-L N=1029 and N=261 (Dh=64), bf16;
and, as the bar, torch SDPA's backward (cuDNN and flash forced in turn) on the pre-rotated q, k and
v as the SDPA route holds them (the route's rotation and its transpose are not in that time).
Each time is the median of >= 20 calls: CUDA events around each call, the L2 flushed before it and
the device drained after the flush, after a warm-up (the first call compiles).

How to read it: `tflops` counts the backward as 2.5x the forward's 4 B H N^2 Dh (as
dinov3_fast/bench/cases/attention.py does), so the kernels' recomputation of P and dP does not
count; an H100's measured bf16 rate is ~716. `rel_diff` is the largest |dqkv - default's dqkv|
over the largest |default's dqkv| (SDPA: its dq and dk taken back through the transposed
rotation): schedules differ in summation order only, so anything above TOL (`ok` false) is a
wrong kernel, whatever its speed. A schedule's ms against `default` is its speed-up; against
`sdpa:cudnn` whether it could replace the SDPA route (ops/attention SDPA_ROUTE_MIN_TOKENS).
Candidates run in priority order; past --budget-s the rest are listed under `skipped`, and the
JSON is rewritten after every row, so a kill keeps what was measured.

    python benchmarks/attention_bwd_sweep.py --json $OUT/attn_bwd_sweep.json
    python benchmarks/attention_bwd_sweep.py --dry-run --json /tmp/sweep.json   # CPU, interpreter

Without a GPU (and without --dry-run) it prints one line and exits 0. --dry-run runs a tiny fp32
shape under the Triton interpreter (every candidate, the checks and the JSON; times meaningless).
Registers, spills and wgmma of every candidate: `python tools/aot_compile.py --attention-bwd-sweep`.
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
    """rel_diff against the default's gradient, and WRONG above TOL; "no reference" when the default failed."""
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
    """One backward schedule: rope_attention_bwd_triton's config, dq_config and prerotate."""
    name: str
    config: dict | None = None
    dq_config: dict | None = None
    prerotate: bool = False
    note: str = ""

    @property
    def kwargs(self) -> dict:
        return dict(config=self.config, dq_config=self.dq_config, prerotate=self.prerotate)


def tiles(block: int, inner: int, warps: int = 8, stages: int = 2) -> dict:
    return dict(BLOCK=block, BLOCK_INNER=inner, num_warps=warps, num_stages=stages)


SHAPES = (Shape("vit7b_4101tok", 4, 32, 4101, 128), Shape("vitl_1029tok", 16, 16, 1029, 64),
          Shape("vitl_261tok", 32, 16, 261, 64))
DRY_RUN_SHAPES = (Shape("dry_run_37tok", 2, 2, 37, 32),)
# Per head dim, in priority order; sm_90 registers/spills from tools/aot_compile.py (triton 3.9,
# with the JIT's specialisation): none spills except where the note says so.
CANDIDATES = {
    128: (
        Candidate("default", note="bwd_config: one kernel 64/32, rotation in the loops; 246 regs"),
        Candidate("prerot", tiles(64, 32), prerotate=True, note="237 regs"),
        Candidate("prerot_64x64", tiles(64, 64), prerotate=True, note="253 regs"),
        Candidate("prerot_split_64x64_128x64", tiles(64, 64), tiles(128, 64), True, "dkdv 248 regs, dq 230"),
        Candidate("prerot_split_64x32_128x64", tiles(64, 32), tiles(128, 64), True, "dkdv 175 regs, dq 230"),
        Candidate("prerot_split_128x32_128x32", tiles(128, 32), tiles(128, 32), True,
                  "FA2/tutorial layout; dkdv spills 168 B (255 regs), dq 238"),
        Candidate("split_64x32_128x32", tiles(64, 32), tiles(128, 32), False, "no prerotation; dkdv 214 regs, dq 255"),
    ),
    64: (
        Candidate("default", note="bwd_config: one kernel 64/32, rotation in the loops; 159 regs"),
        Candidate("prerot_128x64", tiles(128, 64), prerotate=True, note="246 regs"),
        Candidate("prerot_split_128x64_128x64", tiles(128, 64), tiles(128, 64), True, "dkdv 217 regs, dq 126"),
        Candidate("prerot_128x32", tiles(128, 32), prerotate=True, note="222 regs"),
        Candidate("128x64", tiles(128, 64), note="rotation in the loops; 241 regs"),
        Candidate("prerot_split_128x64_128x64_s3", tiles(128, 64, stages=3), tiles(128, 64, stages=3), True,
                  "dkdv 244 regs, dq 126"),
    ),
}
SDPA_BACKENDS = ("cudnn", "flash")


def candidates_for(head_dim: int) -> tuple[Candidate, ...]:
    """The candidates at a head dim (the Dh=64 list below 64: the dry run's Dh=32)."""
    return CANDIDATES[128 if head_dim > 64 else 64]


def bwd_flops(s: Shape) -> float:
    return 2.5 * 4 * s.B * s.H * s.N * s.N * s.Dh


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
    """Inputs and forward outputs at one shape, and the gradient the others are compared with
    (the first candidate's, `default`)."""

    def __init__(self, s: Shape, device, dtype):
        import torch

        from dinov3_fast.bench.cases.attention import rope_tables
        from dinov3_fast.ops.attention import triton as attn_triton

        self.s, self.bwd = s, attn_triton.rope_attention_bwd_triton
        gen = torch.Generator(device).manual_seed(0)
        T, C = s.B * s.N, s.H * s.Dh
        self.qkv = torch.randn(T, 3 * C, device=device, dtype=dtype, generator=gen)
        self.dout = torch.randn(T, C, device=device, dtype=dtype, generator=gen)
        self.sin, self.cos = rope_tables(s.N - PREFIX, s.Dh, device)
        self.out, self.lse = attn_triton.rope_attention_fwd_triton(self.qkv, self.sin, self.cos, None, s.H, s.N)
        self.ref = None

    def call(self, cand: Candidate):
        s = self.s
        return self.bwd(self.dout, self.qkv, self.out, self.lse, self.sin, self.cos, None, s.H, s.N, **cand.kwargs)

    def rel_diff(self, dqkv, is_default: bool) -> float | None:
        """Largest |dqkv - default's| over the largest |default's|; the default's own row sets the
        reference (0.0); None when the default did not run, so nothing is compared against another
        candidate."""
        import torch

        if is_default:
            self.ref = dqkv
        if self.ref is None:
            return None
        if not torch.isfinite(dqkv).all():
            return float("inf")
        return ((dqkv.float() - self.ref.float()).abs().max() / self.ref.float().abs().max().clamp_min(1e-30)).item()

    def sdpa(self, backend: str):
        """(callable timing SDPA's backward on the rotated q, k and v, its dqkv rotated back)."""
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from dinov3_fast.ops.attention import triton as attn_triton

        s = self.s
        q, k, v = self.qkv.view(s.B, s.N, 3, s.H, s.Dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, Dh] views
        q, k = attn_triton.apply_rope_triton(q, k, self.sin, self.cos, transpose=False)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        kernel = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
        with sdpa_kernel(kernel):
            o = F.scaled_dot_product_attention(q, k, v)
        do = self.dout.view(s.B, s.N, s.H, s.Dh).transpose(1, 2)

        def step():
            return torch.autograd.grad(o, (q, k, v), do, retain_graph=True)

        dq, dk, dv = step()
        dq, dk = attn_triton.apply_rope_triton(dq, dk, self.sin, self.cos, transpose=True)
        dqkv = torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(s.B * s.N, -1)  # [B, N, 3, H, Dh]
        return step, dqkv


# ----------------------------------------------------------------------------- driver

def environment(dry_run: bool) -> dict:
    import torch
    import triton

    return {"card": torch.cuda.get_device_name() if not dry_run else "cpu (interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "git": os.environ.get("GIT_REV"),
            "dry_run": dry_run, "tol": TOL, "flops": "2.5 x 4 B H N^2 Dh"}


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
        entries = [("triton", c) for c in candidates_for(s.Dh)] + [("sdpa", b) for b in SDPA_BACKENDS]
        for kind, what in entries:
            name = what.name if kind == "triton" else f"sdpa:{what}"
            if time.perf_counter() - t0 > budget_s:
                report["skipped"].append(f"{s.name} {name}")
                continue
            row = {"shape": s.name, "B": s.B, "H": s.H, "N": s.N, "Dh": s.Dh, "candidate": name}
            if kind == "triton":
                row.update(config=what.config, dq_config=what.dq_config, prerotate=what.prerotate, note=what.note)
            try:
                run = run or ShapeRun(s, device, dtype)
                if kind == "triton":
                    step, dqkv = functools.partial(run.call, what), run.call(what)  # the first call compiles
                elif device.type == "cuda" or what == "flash":  # the CPU has no cuDNN
                    step, dqkv = run.sdpa(what)
                else:
                    raise RuntimeError("no cuDNN on the CPU")
                ms = median_ms(step, device, reps)
                diff = run.rel_diff(dqkv, is_default=name == "default")
                row.update(ms=round(ms, 4), tflops=round(bwd_flops(s) / ms / 1e9, 1), rel_diff=diff,
                           ok=None if diff is None else diff <= TOL)
            except Exception as exc:  # noqa: BLE001 - an unavailable backend or a failed launch is a row, not the end
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            report["rows"].append(row)
            save()
            line = (f"{s.name:<15}{name:<32}" + (f"{row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s  " + verdict(row)
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
    parser.add_argument("--dry-run", action="store_true", help="a tiny fp32 shape on the CPU under the Triton interpreter")
    parser.add_argument("--budget-s", type=float, default=45.0, help="start no candidate after this many seconds")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per candidate (median)")
    parser.add_argument("--shape", action="append", choices=[s.name for s in SHAPES], help="only these shapes")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    from tqdm import tqdm

    if not args.dry_run and not torch.cuda.is_available():
        print("attention_bwd_sweep: no CUDA GPU here, nothing measured (--dry-run runs a tiny shape on the CPU)")
        return 0
    if args.dry_run:
        shapes, device, dtype, reps = DRY_RUN_SHAPES, torch.device("cpu"), torch.float32, 1
    else:
        shapes = [s for s in SHAPES if not args.shape or s.name in args.shape]
        device, dtype, reps = torch.device("cuda"), torch.bfloat16, max(args.reps, 20)
    total = sum(len(candidates_for(s.Dh)) + len(SDPA_BACKENDS) for s in shapes)
    with tqdm(total=total, desc="attention bwd sweep", file=sys.stderr, disable=None) as progress:
        report = sweep(shapes, device, dtype, reps, args.budget_s, args.json, progress)
    wrong = [r for r in report["rows"] if r.get("ok") is False]
    print(f"{len(report['rows'])} rows in {report['elapsed_s']} s, {len(wrong)} flagged wrong, "
          f"{len(report['skipped'])} skipped for time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
