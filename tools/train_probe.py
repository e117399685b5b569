"""The largest batch per GPU that trains, for one ops setting, in one process (issue #7).

    python tools/train_probe.py --preset vitl16_h100 --ops fused --batches 104,112,120,128 --json probe.json

Builds the models and optimizer once, then runs `--steps` training steps at each batch in
ascending order and stops at the first out-of-memory error (after an OOM the allocator is
fragmented, so a larger batch is not tried). Per batch it records whether it trained, the peak
memory of those steps (torch.cuda.max_memory_allocated, reset before each batch; on a CPU the
process's max RSS, which never resets), the last step's img/s and the memory planner's total for
the same config. The JSON is rewritten after every batch (a `timeout` kill keeps what was
measured) under the key `--ops`, so two invocations (fused, reference) share one file.

Eager by default (`train.compile=false`): a compiled run would recompile for every new batch;
selective AC saves the same tensors either way, so the eager limit is the conservative one.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dinov3_fast._json import write_json_atomically  # noqa: E402
from dinov3_fast.train.config import apply_overrides, arch_overrides, get_preset  # noqa: E402

GIB = 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vitl16_h100")
    parser.add_argument("--arch", help="student.arch override")
    parser.add_argument("--ops", choices=("fused", "reference"), required=True)
    parser.add_argument("--batches", required=True, help="comma-separated batch sizes per GPU, tried ascending")
    parser.add_argument("--steps", type=int, default=2, help="training steps per batch")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--json", required=True, help="results file (updated in place under the key --ops)")
    parser.add_argument("opts", nargs="*", help="overrides section.key=value")
    args = parser.parse_args(argv)

    from dinov3_fast.train.loop import _peak_memory, allocator_record, build_state, train_step
    from dinov3_fast.train.planner import plan_memory

    batches = sorted({int(b) for b in args.batches.replace(" ", ",").split(",") if b})
    overrides = [f"train.ops={args.ops}", f"train.compile={args.compile}", f"train.batch_size_per_gpu={batches[0]}",
                 "checkpointing.period=-1", "evaluation.knn_val_samples=0"]
    if args.arch:
        overrides += arch_overrides(args.arch)
    cfg = apply_overrides(get_preset(args.preset), overrides + list(args.opts))
    plans = {b: plan_memory(apply_overrides(cfg, [f"train.batch_size_per_gpu={b}"]), world_size=1).total / GIB
             for b in batches}

    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {}
    entry = {"preset": args.preset, "arch": cfg.student.arch, "ac": cfg.train.ac, "compile": args.compile,
             "steps_per_batch": args.steps, "trials": [], "largest_ok": None}
    results[args.ops] = entry

    def save() -> None:
        write_json_atomically(path, results)

    state = build_state(copy.deepcopy(cfg))
    dev = state.device
    entry["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    entry["allocator"] = None  # what is in effect, read after the first batch
    save()
    for b in batches:
        state.cfg.train.batch_size_per_gpu = b  # next_batch reads it each step
        trial = {"batch": b, "plan_gib": plans[b], "ok": False}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                logs = train_step(state)
                float(logs["total_loss"])  # synchronises
                step_time = time.perf_counter() - t0
        except torch.OutOfMemoryError as exc:
            trial["error"] = "OutOfMemoryError"
            trial["message"] = str(exc).splitlines()[0][:300]
            entry["trials"].append(trial)
            save()
            print(f"{args.ops} batch {b}: out of memory (plan {plans[b]:.2f} GiB)", flush=True)
            break
        trial.update(ok=True, peak_mem_gib=_peak_memory(dev), img_per_s=b / step_time,
                     loss=float(logs["total_loss"]))
        entry["trials"].append(trial)
        entry["largest_ok"] = b
        if entry["allocator"] is None:
            entry["allocator"] = allocator_record(dev)
        save()
        print(f"{args.ops} batch {b}: trains, peak {trial['peak_mem_gib']:.2f} GiB (plan {plans[b]:.2f} GiB), "
              f"{trial['img_per_s']:.1f} img/s (last step)", flush=True)
    if dist.is_initialized():  # one GPU's FSDP2 group, set up by build_state
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
