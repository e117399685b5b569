"""Ahead-of-time compile check for every Triton kernel, no GPU needed.

The Triton interpreter proves arithmetic but accepts code the GPU compiler rejects. This script:
  1. runs each op's fused implementation (forward and backward) on every benchmark preset, with
     CPU tensors dispatched as if on a GPU, while `JITFunction.run` is patched to *record* each
     launch (kernel, argument types, constexprs, num_warps/num_stages) instead of running it;
     autotuned kernels record every config they could pick;
  2. compiles each distinct launch with `triton.compile` for sm_90 and sm_80;
  3. reports registers, spills and shared memory (cuobjdump -res-usage on the cubin), whether a
     kernel with a tensor-core dot lowered to wgmma on sm_90, and from its SASS (cuobjdump -sass)
     its tensor-core instructions by shape (HGMMA m x n x k on sm_90, HMMA on sm_80) and its
     global loads and stores by width.
The attention's optional schedules (pre-rotated q/k forward and backward, separate dk/dv and dq
passes), which default dispatch never launches, are recorded once each at ViT-7B's shape on
fwd_config's / bwd_config's tiles; `--attention-sweep` records instead every candidate of
benchmarks/attention_sweep.py at its shapes (the sweep's registers, spills and wgmma, before any
device time is spent on it).
It must run without TRITON_INTERPRET (kernels must be real JITFunctions).

    python tools/aot_compile.py --json out.json --doc docs/kernels.md
    python tools/aot_compile.py --attention-sweep --target sm_90 --json sweep.json
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tools/aot_compile.py needs real JIT kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402

try:  # the JIT's own argument specialisation (private API; triton >= 3.5)
    from triton._C.libtriton import native_specialize_impl  # noqa: E402
except ImportError:  # older/newer triton: compile unspecialised (registers then read high)
    native_specialize_impl = None
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import dinov3_fast.ops  # noqa: E402
from dinov3_fast.bench.runner import grad_outputs  # noqa: E402
from dinov3_fast.ops._dispatch import simulate_cuda_dispatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "i1"}


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type argument {value!r}")


class Recorder:
    def __init__(self):
        self.launches: dict[str, dict] = {}

    def record(self, fn: JITFunction, args: tuple, kwargs: dict) -> None:
        names = [p.name for p in fn.params]
        bound = dict(zip(names, args))
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        bound.update(kwargs)
        signature, constexprs = {}, {}
        for p in fn.params:
            value = bound.get(p.name, p.default if p.has_default else None)
            if p.is_constexpr:
                signature[p.name] = "constexpr"
                constexprs[p.name] = value
            else:
                signature[p.name] = "constexpr" if value is None else _arg_type(value)
                if value is None:
                    constexprs[p.name] = None
        # The JIT's own specialisation of each launch: ints equal to 1 become constexprs, 16-byte
        # aligned pointers and ints divisible by 16 get tt.divisibility (what a GPU launch compiles).
        attrs = {}
        for i, p in enumerate(fn.params if native_specialize_impl is not None else ()):
            value = bound.get(p.name, p.default if p.has_default else None)
            if p.is_constexpr or value is None or isinstance(value, (bool, float)):
                continue
            kind, spec = native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize,
                                                not p.do_not_specialize_on_alignment)
            if kind == "constexpr":
                signature[p.name] = "constexpr"
                constexprs[p.name] = spec
            elif spec:
                attrs[(i,)] = BaseBackend.parse_attr(spec)
        key = json.dumps([fn.__module__, fn.__name__, signature, constexprs, options, sorted(attrs)], sort_keys=True, default=str)
        self.launches.setdefault(key, {"fn": fn, "signature": signature, "constexprs": constexprs, "options": options, "attrs": attrs})

    def install(self):
        recorder = self

        def run(self, *args, grid, warmup, **kwargs):
            recorder.record(self, args, dict(kwargs))

        def autotune_run(self, *args, **kwargs):
            for config in self.configs:
                self.fn.run(*args, **{**kwargs, **config.all_kwargs()})

        JITFunction.run = run
        Autotuner.run = autotune_run


@contextlib.contextmanager
def matmul_shapes_only():
    """Within: torch.matmul returns an uninitialised tensor of its result's shape and dtype. Only
    the launches matter here, and they are recorded, never run, so no value is real anyway. A GPU
    preset's GEMMs on the CPU are another matter: the fused head loss at ViT-L's iBOT shape is ~0.8
    TFLOP in bf16, which took this script past CI's 20 minutes. The function itself is swapped,
    because the op's matmuls run inside a custom op, below any torch-function mode. Only for ops
    whose matmuls run inside their custom op's forward, so no autograd edge is lost."""
    real = torch.matmul

    def shape_only(a, b):
        meta = real(a.to("meta"), b.to("meta"))
        return torch.empty(meta.shape, dtype=meta.dtype, device=a.device)

    torch.matmul = shape_only
    try:
        yield
    finally:
        torch.matmul = real


# ops whose bench presets run GPU-sized matmuls on the CPU around their kernels (see matmul_shapes_only)
MATMUL_SHAPES_ONLY = {"linear_soft_cross_entropy"}


def exercise_ops(ops: list[str] | None = None) -> None:
    """Call every fused impl of every bench case (fwd + bwd) with dispatch simulating a GPU."""
    from dinov3_fast.bench.cases import all_cases

    for case in all_cases():
        # Whole-model cases launch only the ops' kernels, already covered by the ops' own presets.
        if (ops and case.op not in ops) or case.is_model:
            continue
        for name, impl in case.impls.items():
            # Triton launches only: "fused" (default dispatch, simulating a GPU), "fused:triton", and
            # "fused:kernels" where "fused" at long N is the rotation + SDPA (covered by apply_rope's
            # own presets; SDPA would run for real on the CPU). Other forced backends (cpu, cuda) launch none.
            if name not in ("fused", "fused:triton", "fused:kernels") or (
                    name == "fused" and "fused:kernels" in case.impls):
                continue
            args, kwargs = case.make_inputs(torch.device("cpu"))
            skip_matmuls = matmul_shapes_only() if case.op in MATMUL_SHAPES_ONLY else contextlib.nullcontext()
            with simulate_cuda_dispatch(), skip_matmuls, torch.no_grad() if not case.backward else torch.enable_grad():
                outs = grad_outputs(impl(*args, **kwargs))
                if case.backward and outs:
                    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def _sweep_module():
    spec = importlib.util.spec_from_file_location("attention_sweep", ROOT / "benchmarks" / "attention_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def _attention_pass(shape, direction: str, **schedule) -> None:
    """rope_attention_{fwd,bwd}_triton on empty bf16 inputs of a sweep Shape (B, H, N, Dh; 5 prefix tokens)."""
    from dinov3_fast.ops.attention.triton import rope_attention_bwd_triton, rope_attention_fwd_triton

    T, C = shape.B * shape.N, shape.H * shape.Dh
    qkv, out = torch.empty(T, 3 * C, dtype=torch.bfloat16), torch.empty(T, C, dtype=torch.bfloat16)
    sin = cos = torch.empty(shape.N - 5, shape.Dh)
    if direction == "fwd":
        rope_attention_fwd_triton(qkv, sin, cos, None, shape.H, shape.N, **schedule)
    else:
        rope_attention_bwd_triton(out, qkv, out, torch.empty(shape.H, T), sin, cos, None, shape.H, shape.N,
                                  **schedule)


def exercise_attention_schedules(sweep: bool) -> None:
    """The attention's schedules beyond its defaults: each kernel variant once (ViT-7B's shape,
    fwd_config's / bwd_config's tiles: pre-rotated forward, pre-rotated backward with a separate dq
    launch), or (sweep) every sweep candidate."""
    mod = _sweep_module()
    if not sweep:
        seven_b = next(s for s in mod.SHAPES if s.Dh == 128)
        _attention_pass(seven_b, "fwd", prerotate=True)
        _attention_pass(seven_b, "bwd", dq_config=dict(BLOCK=64, BLOCK_INNER=32, num_warps=8, num_stages=2),
                        prerotate=True)
        return
    for shape in mod.SHAPES:
        for cand in mod.candidates_for(shape.Dh):
            _attention_pass(shape, cand.direction, **cand.kwargs)


def all_kernels() -> set[tuple[str, str]]:
    """(module, name) of every top-level @triton.jit kernel in dinov3_fast/ops/*/triton.py."""
    found = set()
    for info in pkgutil.iter_modules(dinov3_fast.ops.__path__):
        try:
            mod = importlib.import_module(f"dinov3_fast.ops.{info.name}.triton")
        except ModuleNotFoundError:
            continue
        for attr, value in vars(mod).items():
            if isinstance(value, JITFunction) and attr.endswith("_kernel"):
                found.add((mod.__name__, attr))
    return found


def _cuobjdump(cubin: bytes, flag: str) -> str:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(cuobjdump), flag, f.name], capture_output=True, text=True).stdout


# A SASS tensor-core instruction and its shape: Hopper's warpgroup HGMMA.64x16x16.F32.BF16 (m x n x k),
# Ampere's warp HMMA.16816.F32.BF16 (m16 n8 k16).
_MMA = re.compile(r"\b(HGMMA|HMMA)\.(\w+)")


def mma_census(sass: str) -> dict[str, int]:
    """Tensor-core instructions in a kernel's SASS by opcode and shape ("HGMMA.64x16x16": 64),
    counted in the binary, not as executed: a software-pipelined loop body appears more than once.
    A wgmma's n (the second figure) is what the disassembly tells about tile shapes: each
    instruction multiplies a 64-row slice by n columns, so a warpgroup's share of a tile whose
    columns are split between warpgroups runs as narrow, less efficient instructions."""
    return dict(sorted(Counter(f"{op}.{shape}" for op, shape in _MMA.findall(sass)).items()))


# A global load or store and its width: LDG.E.128 (a 16-byte vector), LDG.E.64, LDG.E.U16, plain LDG.E (32
# bits); LDGSTS is the asynchronous global-to-shared copy (cp.async) of pipelined loops
_GLOBAL = re.compile(r"\b(LDGSTS|LDG|STG)(?=[.\s;])((?:\.[A-Z0-9]+)*)")
_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def global_access_census(sass: str) -> dict[str, int]:
    """Global loads and stores in a kernel's SASS by width in bits ("LDG.128": 6, "STG.32": 4),
    counted in the binary as `mma_census` is. For a memory-bound kernel it says whether its
    streams move 16-byte vectors per thread (128) or single elements (32 or less)."""
    def bits(suffixes: str) -> int:
        return next((_WIDTH[x] for x in suffixes.split(".") if x in _WIDTH), 32)

    return dict(sorted(Counter(f"{op}.{bits(suffixes)}" for op, suffixes in _GLOBAL.findall(sass)).items()))


def _resources(cubin: bytes) -> dict:
    text = _cuobjdump(cubin, "-res-usage")
    regs = re.search(r"REG:(\d+)", text)
    shared = re.search(r"SHARED:(\d+)", text)
    spill = re.search(r"(\d+) bytes spill stores", text) or re.search(r"STACK:(\d+)", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "static_shared": int(shared.group(1)) if shared else None,
            "stack_bytes": int(spill.group(1)) if spill else None,
            "mma": mma_census(sass := _cuobjdump(cubin, "-sass")), "global": global_access_census(sass)}


def compile_one(launch: dict, target_name: str) -> dict:
    """One recorded launch compiled for one target: its row (resources, census, or the error)."""
    fn = launch["fn"]
    row = {"kernel": fn.__name__, "module": fn.__module__, "target": target_name,
           "signature": {k: v for k, v in launch["signature"].items() if v != "constexpr"},
           "constexprs": {k: v for k, v in launch["constexprs"].items()}, **launch["options"]}
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=launch["signature"], constexprs=launch["constexprs"],
                                        attrs=launch["attrs"])
        kernel = triton.compile(src, target=TARGETS[target_name], options=dict(launch["options"]))
        row.update(_resources(kernel.asm["cubin"]))
    except Exception as exc:  # reported, and fails the test
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return row
    row.update({"shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps,
                "has_dot": "tt.dot" in kernel.asm["ttir"], "wgmma": "wgmma" in kernel.asm["ptx"],
                "half_inputs": any(v in ("*bf16", "*fp16") for v in launch["signature"].values())})
    return row


def compile_all(recorder: Recorder, targets: list[str]) -> list[dict]:
    """Every recorded launch for every target, in order, compiled on one thread per CPU: Triton
    releases the GIL in its MLIR/LLVM passes (its own AsyncCompileMode compiles on a thread pool)
    and ptxas and cuobjdump are subprocesses. On the 2-core CI machine, with an empty Triton
    cache, the 218 compiles of the bench presets took 255 s against 451 s one after another."""
    jobs = [(launch, target) for launch in recorder.launches.values() for target in targets]
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: compile_one(*job), jobs))


def _format_census(census: dict[str, int]) -> str:
    """"HGMMA 64x16x16 x64, 64x32x16 x8" from {"HGMMA.64x16x16": 64, "HGMMA.64x32x16": 8}."""
    by_op: dict[str, list[str]] = {}
    for key, n in census.items():
        op, shape = key.split(".", 1)
        by_op.setdefault(op, []).append(f"{shape} x{n}")
    return "; ".join(f"{op} {', '.join(shapes)}" for op, shapes in by_op.items())


def write_doc(results: list[dict], path: Path) -> None:
    lines = ["# Triton kernels: resources per compiled configuration", "",
             "Generated by `python tools/aot_compile.py --doc docs/kernels.md` (ahead-of-time compile, no GPU):",
             "every launch the ops make at the benchmark presets, compiled with triton "
             f"{triton.__version__}. `wgmma`: the sm_90 PTX uses Hopper warpgroup MMA. `tensor-core instructions`:",
             "the SASS's HGMMA (sm_90, m x n x k per warpgroup) or HMMA (sm_80) instructions by shape, counted in",
             "the binary (a pipelined loop body appears more than once), not as executed; a narrow n comes from a",
             "narrow tile or from a tile's columns split between warpgroups (docs/architecture.md, \"The backward's",
             "schedules\").", "",
             "`global loads / stores`: the SASS's LDG / STG instructions (and LDGSTS, the asynchronous",
             "global-to-shared copy of pipelined loops) by width in bits (128: a 16-byte vector per thread),",
             "counted the same way.", "",
             "| kernel | target | input dtype | constexprs | warps | regs | stack B | shared B | dot | wgmma "
             "| tensor-core instructions | global loads / stores |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["module"], r["kernel"], r["target"], json.dumps(r["constexprs"], default=str))):
        if "error" in r:
            lines.append(f"| `{r['kernel']}` | {r['target']} | | | | compile error | | | | | | |")
            continue
        dtypes = sorted({v[1:] for v in r["signature"].values() if v.startswith("*") and v != "*fp32"}) or ["fp32"]
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.isupper())
        lines.append(f"| `{r['kernel']}` | {r['target']} | {'/'.join(dtypes)} | {consts} | {r['num_warps']} | "
                     f"{r['registers']} | {r['stack_bytes']} | {r['shared']} | {'y' if r['has_dot'] else ''} | "
                     f"{'y' if r['wgmma'] else ''} | {_format_census(r['mma'])} | {_format_census(r['global'])} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write per-launch results here")
    parser.add_argument("--doc", help="write the markdown resource table here")
    parser.add_argument("--op", action="append", help="only the bench cases of these ops (repeatable)")
    parser.add_argument("--attention-sweep", action="store_true",
                        help="only the candidates of benchmarks/attention_sweep.py, not the bench cases")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="only these targets (repeatable)")
    args = parser.parse_args()
    recorder = Recorder()
    recorder.install()
    if not args.attention_sweep:
        exercise_ops(args.op)
    if args.attention_sweep or not args.op or "rope_attention" in args.op:
        exercise_attention_schedules(args.attention_sweep)
    results = compile_all(recorder, args.target or sorted(TARGETS))
    compiled = {(r["module"], r["kernel"]) for r in results}
    report = {"results": results, "never_launched": sorted(map(list, all_kernels() - compiled)),
              "triton": triton.__version__}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    if args.doc:
        write_doc(results, Path(args.doc))
    errors = [r for r in results if "error" in r]
    print(f"{len(recorder.launches)} launch configurations, {len(results)} compiles, {len(errors)} errors, "
          f"never launched: {report['never_launched']}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
