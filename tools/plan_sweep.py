"""What fits on one GPU, by the memory planner (issue #7): per arch, AC mode and ops setting, the
largest batch per GPU whose plan fits a memory budget, and at the reference's largest batch, how
much less memory the fused ops plan for.

    python tools/plan_sweep.py --save benchmarks/results/plan/h100_80gb.json     # ~15 min on 2 cores

These are plans, not measurements. Where they can be checked, they have been: on the H100 of
2026-11-26 the plan was 2.5-3.8% above the measured peak (ViT-L, batch 128), and the batch probe
trained every batch planned at <= 68.7 GiB and ran out of memory at 73.4 and 74.2 GiB, with the
allocator's fixed segments (6.9 GiB reserved but unallocated at the failure). The default budget
of 70 GiB lies between those. The trainer now uses expandable segments, so the budget is
conservative until a GPU run probes it again.

The recipe is the preset's (vitl16_h100: 2 x 224 global + 8 x 96 local crops, 65k-prototype
heads, bf16 modules under 1-rank FSDP2) with `student.arch` replaced. Batches are multiples of
`--step`. The plan grows linearly with the batch (activations, heads and targets all scale with it),
so two plans predict the limit, and one or two more check it.
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
from dinov3_fast.train.config import apply_overrides, get_preset  # noqa: E402
from dinov3_fast.train.planner import plan_memory  # noqa: E402

GIB = 2**30
KIND = "dinov3_fast.plan_sweep"
OPS = ("fused", "reference")
MIN_BATCH = 2  # KoLeo needs two images per rank


class Planner:
    """Plans (GiB) by (arch, ac, ops, batch), each computed once."""

    def __init__(self, preset: str, progress: tqdm):
        self.preset, self.progress, self.cache = preset, progress, {}

    def __call__(self, arch: str, ac: str, ops: str, batch: int) -> float:
        key = (arch, ac, ops, batch)
        if key not in self.cache:
            cfg = apply_overrides(get_preset(self.preset), [f"student.arch={arch}", f"train.ac={ac}",
                                                            f"train.ops={ops}", f"train.batch_size_per_gpu={batch}"])
            self.cache[key] = plan_memory(cfg, world_size=1).total / GIB
            self.progress.set_postfix_str(f"{arch} {ac} {ops} b{batch}: {self.cache[key]:.1f} GiB")
            self.progress.update()
        return self.cache[key]


def largest_batch(plan, budget: float, step: int) -> int | None:
    """The largest multiple of `step` (or MIN_BATCH) whose plan(batch) <= budget; None if not even
    MIN_BATCH fits. The limit is predicted from the line through two plans, then checked."""
    if plan(MIN_BATCH) > budget:
        return None
    if plan(step) > budget:
        return MIN_BATCH
    probe = 8 * step
    slope = (plan(probe) - plan(step)) / (probe - step)
    batch = max(step, int((step + (budget - plan(step)) / slope) // step * step)) if slope > 0 else probe
    while batch > step and plan(batch) > budget:
        batch -= step
    while plan(batch + step) <= budget:
        batch += step
    return batch


def sweep(archs: list[str], acs: list[str], preset: str, budget: float, step: int) -> list[dict]:
    """One row per (arch, ac): each ops setting's largest batch and plan there, and the fused plan
    at the reference's largest batch (the equal-batch saving)."""
    rows = []
    with tqdm(desc="plans", unit="plan") as progress:
        plan = Planner(preset, progress)
        for arch in archs:
            for ac in acs:
                row = {"arch": arch, "ac": ac}
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
    largest = {ops: [r["arch"] for r in record["rows"] if r[ops]["largest_batch"]] for ops in OPS}
    lines += ["", "Largest arch that fits (archs in the sweep's order, smallest first): "
              + "; ".join(f"{ops} {fits[-1] if fits else 'none'}" for ops, fits in largest.items()) + "."]
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
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
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
