"""Golden loss trace: the per-step loss terms of a fixed-seed CPU run, committed, to catch a
numerics change between commits (torchtitan's loss-trace check).

    python -m dinov3_fast.train.golden            # rerun, compare with the committed trace
    python -m dinov3_fast.train.golden --update   # rerun and overwrite it (an intended change)

The run is the `debug` preset (two-block ViT, 32/16 px crops) in fp32 on the CPU, single process,
fused ops as dispatched by default (`cpu` backends; Triton-interpreter where `_C` is missing),
plus the Gram loss with a Gram teacher at 64 px refreshed every 3 steps (source images at the
default side, 1.25 x the Gram crop), so every loss op, the optimizer, the schedules, the EMA and
the Gram refresh are on the path. One intra-op thread, so the result does not depend on the
machine's core count. `tests/test_train_golden.py` reruns it and compares with `RTOL` / `ATOL`
(the reasons are beside them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

GOLDEN_PATH = Path(__file__).resolve().parents[2] / "tests" / "golden" / "debug_cpu_fp32.json"
STEPS = 8
OVERRIDES = [
    f"train.steps={STEPS}", "train.batch_size_per_gpu=8", "train.seed=0", "train.device=cpu", "train.ops=fused",
    "train.log_every=1", "checkpointing.period=-1", "evaluation.knn_val_samples=0",
    "student.layerscale=0.1", "gram.use_loss=true", "gram.it_load_ema_teacher=0", "gram.update_frequency=3",
    "crops.gram_teacher_crops_size=64", "train.image_size=null",
]
LOSS_KEYS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "gram_loss")
# Tolerance. The trace is bitwise identical from run to run on one machine, but not across x86
# machines with the same torch: ATen and MKL pick vector kernels by ISA (AVX2 / AVX-512), which
# changes fp32 rounding at the ulp level, and a few AdamW steps carry it on. Measured here (an
# AVX-512 AMD EPYC), the largest relative change of any term over the 8 steps: 7e-7 with
# ATEN_CPU_CAPABILITY=default (no vector kernels), 5e-7 with DINOV3_FAST_BACKEND=triton (another
# implementation of every fused op: the fallback where `_C` is not built), 2e-7 with 2 threads
# instead of 1, 0 with MKL_ENABLE_INSTRUCTIONS=AVX2 or SSE4_2. RTOL is ~15x the largest, and
# still catches a 1e-4 relative change of the lr or of the KoLeo weight (measured: 8e-5 and 2e-5
# off). ATOL is a floor for terms near 0. `student.layerscale=0.1` (at the preset's 1e-5 the CLS
# tokens of different images start ~1e-5 apart) keeps KoLeo's -log(nearest distance) well
# conditioned: with 1e-5, the ISA change alone moves KoLeo by 2e-2 at step 1.
RTOL = 1e-5
ATOL = 1e-6


def _backends() -> dict[str, str]:
    """Which backend each fused op dispatches to on CPU tensors here (recorded with the trace)."""
    from dinov3_fast.ops._dispatch import select_backend
    from dinov3_fast.ops import attention, gram, koleo, sinkhorn, soft_ce
    out = {}
    for name, mod in (("attention", attention), ("gram", gram), ("koleo", koleo), ("sinkhorn", sinkhorn),
                      ("soft_ce", soft_ce)):
        try:
            out[name] = select_backend(name, torch.device("cpu"), None, mod.PREFERENCE)
        except Exception as exc:  # noqa: BLE001  (metadata only)
            out[name] = f"? ({exc})"
    return out


def run_trace() -> dict[str, Any]:
    """Run the golden configuration; returns {"losses": {key: [per-step floats]}, metadata}."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py, before a kernel import
    from dinov3_fast.train.config import apply_overrides, get_preset
    from dinov3_fast.train.loop import train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = apply_overrides(get_preset("debug"), [*OVERRIDES, f"train.output_dir={tmp}"])
            hist = train(cfg, progress=False, log_fn=None, device="cpu")
    finally:
        torch.set_num_threads(threads)
    steps = hist["steps"]
    return {"preset": "debug", "overrides": OVERRIDES, "steps": len(steps),
            "losses": {k: [s[k] for s in steps] for k in LOSS_KEYS},
            "torch": torch.__version__, "backends": _backends(),
            "regenerate": "python -m dinov3_fast.train.golden --update"}


def compare(trace: dict[str, Any], golden: dict[str, Any], rtol: float = RTOL, atol: float = ATOL) -> list[str]:
    """The mismatches (empty when the trace matches): one line per step and term out of tolerance."""
    bad = []
    if trace["overrides"] != golden["overrides"]:
        bad.append(f"the golden run's overrides changed: {golden['overrides']} -> {trace['overrides']}")
    for k in LOSS_KEYS:
        got, want = trace["losses"].get(k), golden["losses"].get(k)
        if got is None or want is None or len(got) != len(want):
            n_got, n_want = (None if x is None else len(x) for x in (got, want))
            bad.append(f"{k}: {n_got} steps, golden has {n_want}")
            continue
        for i, (g, w) in enumerate(zip(got, want)):
            if not (math.isfinite(g) and abs(g - w) <= atol + rtol * abs(w)):
                bad.append(f"{k} step {i + 1}: {g!r} vs golden {w!r} (rel {abs(g - w) / max(abs(w), 1e-30):.2e})")
    return bad


def max_rel_error(trace: dict[str, Any], golden: dict[str, Any]) -> float:
    return max(abs(g - w) / max(abs(w), 1e-30) for k in LOSS_KEYS
               for g, w in zip(trace["losses"][k], golden["losses"][k]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinov3_fast.train.golden", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help=f"overwrite {GOLDEN_PATH.name} with this run")
    parser.add_argument("--path", type=Path, default=GOLDEN_PATH)
    args = parser.parse_args(argv)
    trace = run_trace()
    if args.update:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_text(json.dumps(trace, indent=1) + "\n")
        print(f"wrote {args.path} ({trace['steps']} steps, torch {trace['torch']}, backends {trace['backends']})")
        return 0
    golden = json.loads(args.path.read_text())
    bad = compare(trace, golden)
    print(f"max relative difference {max_rel_error(trace, golden):.3e} (rtol {RTOL}, atol {ATOL})")
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
