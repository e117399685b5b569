"""What fits on one GPU, by the memory planner (issue #7): per arch, AC mode and ops setting, the
largest batch per GPU whose plan fits a memory budget, and at the reference's largest batch, how
much less memory the fused ops plan for.

    python tools/plan_sweep.py --save benchmarks/results/plan/h100_80gb.json     # ~200 plans, 4-5 min on 2 cores

These are plans, not measurements. The budget is an assumption. Nothing in this sweep's
configuration has run on a GPU, and the last evidence predates it:
- On the H100 of 2026-11-26 the plan was 2.5-3.8% above the measured peak (ViT-L, batch 128).
- That day's batch probe ran out of memory at 70.1 and 71.6 GiB allocated (79.2 GiB card), with
  5.7-6.9 GiB reserved but unallocated (fixed segments).
- That was before the one-GPU trainer moved to bf16 modules under 1-rank FSDP2, before the fused
  head losses, and before expandable segments.
The default budget of 70 GiB is the card less that day's fragmentation, and stays an assumption
until a probe of the current trainer (benchmarks/train_check.sh) checks it.

The recipe is the preset's (vitl16_h100: 2 x 224 global + 8 x 96 local crops, 65k-prototype
heads, bf16 modules under 1-rank FSDP2) with the student replaced by each arch. Batches are
multiples of `--step`. The search doubles the batch until the plan exceeds the budget, then
bisects. It assumes only that the plan grows with the batch.
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dinov3_fast._json import write_json_atomically  # noqa: E402
from dinov3_fast.train.config import apply_overrides, arch_overrides, get_preset  # noqa: E402
from dinov3_fast.train.planner import MemoryPlan, plan_memory  # noqa: E402

GIB = 2**30
KIND = "dinov3_fast.plan_sweep"
OPS = ("fused", "reference")
MIN_BATCH = 2  # KoLeo needs two images per rank


class Planner:
    """Plans by (arch, ac, ops, batch), each computed once."""

    def __init__(self, preset: str, progress: tqdm):
        self.preset, self.progress, self.cache = preset, progress, {}

    def plan(self, arch: str, ac: str, ops: str, batch: int) -> MemoryPlan:
        key = (arch, ac, ops, batch)
        if key not in self.cache:
            cfg = apply_overrides(get_preset(self.preset), arch_overrides(arch) + [
                f"train.ac={ac}", f"train.ops={ops}", f"train.batch_size_per_gpu={batch}"])
            self.cache[key] = plan_memory(cfg, world_size=1)
            self.progress.set_postfix_str(f"{arch} {ac} {ops} b{batch}: {self.cache[key].total / GIB:.1f} GiB")
            self.progress.update()
        return self.cache[key]

    def __call__(self, arch: str, ac: str, ops: str, batch: int) -> float:
        """The plan's total, GiB."""
        return self.plan(arch, ac, ops, batch).total / GIB


def largest_batch(plan, budget: float, step: int, max_batch: int = 1 << 16) -> int | None:
    """The largest batch in {MIN_BATCH, step, 2 step, ...} (up to max_batch) with plan(batch) <=
    budget, for a plan that grows with the batch; None if not even MIN_BATCH fits. Doubling, then
    bisection: O(log(batch / step)) plans."""
    if step < MIN_BATCH:
        raise ValueError(f"step must be >= {MIN_BATCH} (KoLeo needs two images per rank), got {step}")
    if plan(MIN_BATCH) > budget:
        return None
    if plan(step) > budget:
        return MIN_BATCH
    cap = max(step, max_batch // step * step)
    fits, too_big = step, min(2 * step, cap)
    while plan(too_big) <= budget:
        if too_big == cap:
            return cap
        fits, too_big = too_big, min(2 * too_big, cap)
    while too_big - fits > step:
        mid = (fits + too_big) // 2 // step * step
        fits, too_big = (mid, too_big) if plan(mid) <= budget else (fits, mid)
    return fits


def sweep(archs: list[str], acs: list[str], preset: str, budget: float, step: int) -> list[dict]:
    """One row per (arch, ac): each ops setting's largest batch and plan there, and the fused plan
    at the reference's largest batch (the equal-batch saving)."""
    rows = []
    with tqdm(desc="plans", unit="plan") as progress:
        plan = Planner(preset, progress)
        for arch in archs:
            for ac in acs:
                row = {"arch": arch, "params": plan.plan(arch, ac, "fused", MIN_BATCH).params_total, "ac": ac}
                for ops in OPS:
                    b = largest_batch(lambda n, ops=ops: plan(arch, ac, ops, n), budget, step)
                    row[ops] = {"largest_batch": b, "plan_gib": plan(arch, ac, ops, b or MIN_BATCH)}
                b_ref = row["reference"]["largest_batch"]
                if b_ref is not None:
                    fused = plan(arch, ac, "fused", b_ref)
                    row["equal_batch"] = {"batch": b_ref, "fused_gib": fused,
                                          "reference_gib": row["reference"]["plan_gib"],
                                          "saving": 1 - fused / row["reference"]["plan_gib"]}
                rows.append(row)
    return rows


def table_lines(record: dict) -> list[str]:
    """Markdown table of a saved sweep (tools/benchmarks_md.py puts it in BENCHMARKS.md)."""
    lines = ["| arch | AC | largest batch, fused | largest batch, reference | plan at the reference's batch, fused / reference | less memory, fused |",
             "|---|---|---|---|---|---|"]
    for r in record["rows"]:
        def cell(ops: str) -> str:
            b = r[ops]["largest_batch"]
            return f"{b} ({r[ops]['plan_gib']:.1f} GiB)" if b else f"none (b{MIN_BATCH}: {r[ops]['plan_gib']:.1f} GiB)"
        eq = r.get("equal_batch")
        lines.append(f"| {r['arch']} | {r['ac']} | {cell('fused')} | {cell('reference')} | "
                     + (f"b{eq['batch']}: {eq['fused_gib']:.1f} / {eq['reference_gib']:.1f} GiB | {100 * eq['saving']:.1f}% |"
                        if eq else "- | - |"))
    fitting = {ops: [r for r in record["rows"] if r[ops]["largest_batch"]] for ops in OPS}
    lines += ["", "Largest arch that fits (by parameters): " + "; ".join(
        f"{ops} {max(rows, key=lambda r: r['params'])['arch'] if rows else 'none'}" for ops, rows in fitting.items()) + "."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vitl16_h100")
    parser.add_argument("--archs", nargs="+", default=["vit_large", "vit_huge2", "vit_giant2", "vit_7b"])
    parser.add_argument("--ac", nargs="+", default=["selective", "full", "none"], choices=["selective", "full", "none"])
    parser.add_argument("--budget-gib", type=float, default=70.0, help="memory a plan may use (see the docstring)")
    parser.add_argument("--card", default="H100 80GB", help="the card the budget stands for (recorded)")
    parser.add_argument("--step", type=int, default=8, help="batch granularity")
    parser.add_argument("--save", help="write the record (JSON) here")
    args = parser.parse_args(argv)
    rows = sweep(args.archs, args.ac, args.preset, args.budget_gib, args.step)
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    record = {"kind": KIND, "version": 1, "date": datetime.date.today().isoformat(), "card": args.card,
              "budget_gib": args.budget_gib, "preset": args.preset, "step": args.step, "torch": torch.__version__,
              "git_rev": rev or None, "rows": rows}
    print("\n".join(table_lines(record)))
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(args.save, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
