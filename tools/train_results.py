"""Issue #7's training figures from one benchmarks/train_check.sh run, and its goals.

    python tools/train_results.py OUT_DIR                       # print the summary of a run
    python tools/train_results.py OUT_DIR --save benchmarks/results/train/h100_2026-12-01.json

OUT_DIR holds what train_check.sh writes: env.json, train_{fused,reference}.json (`dinov3-fast
train --json`), plan_{fused,reference}.json (`dinov3-fast plan --json`) and, where those steps ran,
probe_ac_full.json (tools/train_probe.py at one batch with train.ac=full: both ops settings'
peak memory at an equal batch under full AC) and probe.json (the largest batch). `--save` writes
one compact record (the run's environment, the steady-state figures of each ops setting, the
plans, the probes) to commit under
benchmarks/results/train/; tools/benchmarks_md.py reads those records and marks issue #7's goals
met / not met / not measured in BENCHMARKS.md.

Figures: img/s is the time-weighted rate over the logged intervals after the first (the first
holds the warm-up: compile, Triton JIT, allocator growth; an interval run under the profiler,
`train.profile_steps`, is left out too, and its summary is shown beside the run); MFU is the
trainer's at that rate: the backbone matmul FLOPs the GPU runs (stochastic depth's dropped
images not counted, `train_flops_per_image`) over the card's dense bf16 peak; peak memory is the largest logged
`peak_mem_gib` (torch.cuda.max_memory_allocated, so the CUDA context and the allocator's cached
blocks are out of it, as they are out of the plan); the planner error is plan / measured - 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the device runs it from a bare checkout

from dinov3_fast._json import write_json_atomically  # noqa: E402
from dinov3_fast.train.profiling import format_summary  # noqa: E402

GIB = 2**30
OPS = ("fused", "reference")
KIND = "dinov3_fast.train_check"


# --------------------------------------------------------------------------- one run

def summarise_train(data: dict[str, Any]) -> dict[str, Any]:
    """Steady-state figures of one `dinov3-fast train --json` file (see the module docstring)."""
    cfg = data["config"]
    logged = [s for s in data["steps"] if s.get("img_per_s") is not None and s.get("step_time") is not None]
    if not logged:
        raise ValueError("the train JSON has no logged step (img_per_s / step_time); was --log-every > --steps?")
    # The first interval holds compilation and warm-up: the rates come from the later ones only,
    # and a run with a single interval has no steady rate (None: the goals read "not measured").
    # An interval run under the profiler (`profiled`) is left out too.
    steady = [s for s in logged[1:] if not s.get("profiled")]
    prev = {id(s): (logged[i - 1]["step"] if i else 0) for i, s in enumerate(logged)}
    n = [s["step"] - prev[id(s)] for s in steady]
    seconds = sum(s["step_time"] * k for s, k in zip(steady, n))
    images = sum(s["img_per_s"] * s["step_time"] * k for s, k in zip(steady, n))
    img_s = images / seconds if seconds > 0 else None
    with_mfu = [s for s in logged if s.get("mfu") is not None and s["img_per_s"]]
    mfu = img_s * with_mfu[0]["mfu"] / with_mfu[0]["img_per_s"] if with_mfu and img_s else None
    c, st, t, cp = cfg["crops"], cfg["student"], cfg["train"], cfg["compute_precision"]
    return {
        "arch": st["arch"], "patch_size": st["patch_size"], "batch": t["batch_size_per_gpu"], "ops": t["ops"],
        "ac": t["ac"], "compile": t["compile"], "param_dtype": cp["param_dtype"], "precision": precision_path(cp),
        "crops": [c["global_crops_size"], c["local_crops_size"], c["local_crops_number"]],
        "steps": logged[-1]["step"], "warmup_steps": logged[0]["step"],
        "img_per_s": img_s, "step_time_ms": 1e3 * seconds / sum(n) if sum(n) else None, "mfu": mfu,
        "mfu_counts": "executed FLOPs",
        "peak_mem_gib": max(s["peak_mem_gib"] for s in logged),
        "intervals": [{k: s.get(k) for k in ("step", "img_per_s", "step_time", "peak_mem_gib", "mfu", "total_loss",
                                             "profiled") if k in s} for s in logged],
        "torch": data.get("torch"),
        "allocator": data.get("allocator"),
        "profile": data.get("profile"),
    }


# what a record made before the field existed ran (the one-GPU path until commit c102e03)
OLD_PRECISION = "fp32 modules under autocast (recorded before the field; the path before c102e03)"


def precision_path(cp: dict[str, Any]) -> str:
    """How a one-GPU run computes, from its compute_precision config (dinov3_fast.train.parallelize.
    uses_single_rank_fsdp): modules in the param dtype under a 1-rank FSDP2, or fp32 modules under
    autocast."""
    if cp["param_dtype"] == "fp32":
        return "fp32"
    if cp.get("single_rank_fsdp"):
        return f"{cp['param_dtype']} modules under 1-rank FSDP2"
    return f"fp32 modules under {cp['param_dtype']} autocast"


def build_record(out_dir: str | Path) -> dict[str, Any]:
    """The compact record of one train_check.sh output folder; missing or unreadable files (a step
    killed mid-write) are listed, not fatal."""
    out = Path(out_dir)
    record: dict[str, Any] = {"kind": KIND, "version": 1, "env": {}, "runs": {}, "plans": {}, "probe": None,
                              "ac_full": None, "missing": []}

    def read(name: str) -> Any:
        try:
            return json.loads((out / name).read_text())
        except (OSError, ValueError):
            record["missing"].append(name)
            return None

    record["env"] = read("env.json") or {}
    for ops in OPS:
        train = read(f"train_{ops}.json")
        if train is not None:
            record["runs"][ops] = summarise_train(train)
        plan = read(f"plan_{ops}.json")
        if plan is not None:
            record["plans"][ops] = plan
    for key, name in (("probe", "probe.json"), ("ac_full", "probe_ac_full.json")):
        if (out / name).is_file():
            record[key] = read(name)
    return record


def planner_error(record: dict[str, Any], ops: str) -> float | None:
    """plan / measured - 1 for one ops setting, when the plan is for the run's arch, batch, ac and ops."""
    run, plan = record["runs"].get(ops), record["plans"].get(ops)
    if run is None or plan is None or not run["peak_mem_gib"]:
        return None
    if (plan["arch"], plan["batch_per_rank"], plan["ac"], plan["ops"]) != (run["arch"], run["batch"], run["ac"], ops):
        return None
    return plan["total"] / GIB / run["peak_mem_gib"] - 1


def largest_batch(record: dict[str, Any], ops: str) -> str | None:
    """The largest batch that trained for one ops setting (the probe's trials and the timed run),
    with the first batch that ran out of memory: "120 (128 OOM)", ">= 136 (no OOM)"; None without a probe."""
    trials = ((record.get("probe") or {}).get(ops) or {}).get("trials") or []
    if not trials:
        return None
    run = record["runs"].get(ops)
    ok = [t["batch"] for t in trials if t["ok"]] + ([run["batch"]] if run else [])
    oom = [t["batch"] for t in trials if not t["ok"]]
    if not oom:
        return f">= {max(ok)} (no OOM)"
    below = [b for b in ok if b < min(oom)]
    return f"{max(below)} ({min(oom)} OOM)" if below else f"< {min(oom)} (OOM)"


def full_ac_saving(record: dict[str, Any]) -> tuple[float | None, str]:
    """(1 - fused / reference peak memory, batch text) at the equal batch both settings trained
    under full AC (probe_ac_full.json), or (None, why not)."""
    probe = record.get("ac_full") or {}
    entries = [probe.get(ops) or {} for ops in OPS]
    if not all(entries):
        return None, "no full-AC probe of both ops settings in this run"
    if any(e.get("ac") != "full" for e in entries):
        return None, "the full-AC probe did not run with train.ac=full"
    trained = [{t["batch"]: t for t in e.get("trials", []) if t["ok"]} for e in entries]
    common = sorted(set(trained[0]) & set(trained[1]))
    if not common:
        return None, "no batch trained under full AC with both ops settings"
    b = common[-1]
    return 1 - trained[0][b]["peak_mem_gib"] / trained[1][b]["peak_mem_gib"], f"b{b}, full AC, eager"


# --------------------------------------------------------------------------- issue #7's goals

@dataclass(frozen=True)
class TrainGoal:
    key: str
    text: str
    threshold: float | None  # None: a figure to report, no threshold
    higher_is_better: bool = True


GOALS = (
    TrainGoal("speedup", "ViT-L/16 training img/s, fused >= 1.2x reference", 1.2),
    TrainGoal("mem_saving", "ViT-L/16 training peak memory >= 20% less at equal batch (timed runs)", 0.20),
    TrainGoal("mem_saving_full_ac", "ViT-L/16 training peak memory >= 20% less at equal batch (full AC probe)",
              0.20),
    TrainGoal("mfu", "ViT-L/16 training MFU >= 40% on H100 (fused)", 0.40),
    TrainGoal("plan_error", "planner's peak within 10% of measured (both ops)", 0.10, higher_is_better=False),
    TrainGoal("largest", "largest ViT-L/16 batch per card, each ops (reported)", None),
)


def _recipe_problem(record: dict[str, Any]) -> str | None:
    """Why a record cannot judge issue #7's goals (None: it can)."""
    if not record["env"].get("gpu"):
        return "no GPU in this run"
    for ops, run in record["runs"].items():
        g, loc, n = run["crops"]
        if run["arch"] != "vit_large" or run["patch_size"] != 16 or g not in (224, 256) or n != 8 \
                or loc not in (96, 112):
            return f"the {ops} run is not ViT-L/16 with 2 x 224/256 + 8 x 96/112 local crops"
        if run["param_dtype"] != "bf16":
            return f"the {ops} run is not in bf16 (DINOv3's recipe)"
    return None


def evaluate(goal: TrainGoal, record: dict[str, Any]) -> tuple[float | str | None, str]:
    """(measured figure, status) of one goal on one record; status is met / not met / reported, or
    'not measured (why)'."""
    problem = _recipe_problem(record)
    if problem:
        return None, f"not measured ({problem})"
    runs = record["runs"]
    if goal.key == "largest":
        parts = [f"{ops} {largest}" for ops in OPS if (largest := largest_batch(record, ops))]
        if not parts:
            return None, "not measured (no batch probe in this run)"
        return " / ".join(parts), "reported"
    if goal.key == "mem_saving_full_ac":
        value, how = full_ac_saving(record)
        if value is None:
            return None, f"not measured ({how})"
    elif goal.key == "plan_error":
        errors = [planner_error(record, ops) for ops in OPS]
        if any(e is None for e in errors):
            return None, "not measured (a run or its matching plan is missing)"
        value = max(abs(e) for e in errors)
    elif goal.key == "mfu":
        fused = runs.get("fused")
        if "H100" not in (record["env"].get("gpu") or ""):
            return None, f"not measured (not an H100: {record['env'].get('gpu')})"
        if fused is None or fused["mfu"] is None:
            return None, "not measured (no fused run with an MFU figure)"
        value = fused["mfu"]
    else:
        fused, ref = runs.get("fused"), runs.get("reference")
        if fused is None or ref is None:
            return None, f"not measured (missing the {'fused' if fused is None else 'reference'} run)"
        same = ("arch", "batch", "ac", "compile", "crops", "param_dtype", "precision")
        if any(fused.get(k) != ref.get(k) for k in same):
            return None, "not measured (the two runs differ in more than ops)"
        if goal.key == "speedup":
            if not (fused["img_per_s"] and ref["img_per_s"]):
                return None, "not measured (a run has no interval after its warm-up)"
            value = fused["img_per_s"] / ref["img_per_s"]
        else:
            value = 1 - fused["peak_mem_gib"] / ref["peak_mem_gib"]
    met = value >= goal.threshold if goal.higher_is_better else value <= goal.threshold
    return value, "met" if met else "not met"


def figure_text(value: float, threshold: float | None, higher_is_better: bool = True, scale: float = 1.0,
                digits: int = 2) -> str:
    """`scale * value` with `digits` decimals, or more where fewer would round it onto the other side
    of the threshold (2.996 against 3 reads "2.996", not "3.00" beside "not met")."""
    def met(v: float) -> bool:
        return v >= threshold if higher_is_better else v <= threshold

    text = format(scale * value, f".{digits}f")
    if threshold is None:
        return text
    for extra in range(1, 7):
        if met(float(text) / scale) == met(value):
            break
        text = format(scale * value, f".{digits + extra}f")
    return text


def _fmt_goal_value(goal: TrainGoal, value: float | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if goal.key == "speedup":
        return figure_text(value, goal.threshold, goal.higher_is_better) + "x"
    return figure_text(value, goal.threshold, goal.higher_is_better, scale=100, digits=1) + "%"


def goal_rows(records: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """BENCHMARKS.md goal-table rows (issue | goal | preset | measured | status | run) for issue #7:
    each goal from the last committed record that measures it, else 'not measured'."""
    rows = []
    for goal in GOALS:
        best = None
        for name, record in records:
            value, status = evaluate(goal, record)
            if value is not None:
                best = (value, status, name, record)
        if best is None:
            status = (evaluate(goal, records[-1][1])[1] if records
                      else "not measured (no GPU train run committed yet)")
            rows.append(f"| 7 | {goal.text} | vitl16_h100 | - | {status} | {records[-1][0] if records else '-'} |")
        else:
            value, status, name, record = best
            batch = (record["runs"].get("fused") or {}).get("batch")
            where = (full_ac_saving(record)[1] if goal.key == "mem_saving_full_ac"
                     else f"b{batch}" if batch and goal.key != "largest" else None)
            measured = _fmt_goal_value(goal, value) + (f" ({where})" if where else "")
            rows.append(f"| 7 | {goal.text} | vitl16_h100 | {measured} | {status} | {name} ({_code(record)}) |")
    return rows


def _precision_line(record: dict[str, Any]) -> str:
    """The runs' precision path, once where they share it."""
    paths = {ops: run.get("precision", OLD_PRECISION) for ops, run in record["runs"].items()}
    if len(set(paths.values())) == 1:
        return next(iter(paths.values()))
    return "; ".join(f"{ops}: {path}" for ops, path in paths.items())


def _code(record: dict[str, Any]) -> str:
    """The record's git revision, `*` where the tree had uncommitted changes."""
    env = record["env"]
    return "git unknown" if not env.get("git") else env["git"][:7] + ("*" if env.get("git_dirty") else "")


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def record_lines(name: str, record: dict[str, Any]) -> list[str]:
    """A markdown section for one record: each ops setting's figures beside its plan, and the probe."""
    env = record["env"]
    out = [f"### {name}", "",
           f"Device: {env.get('gpu') or 'CPU (dry run)'}; driver {env.get('driver')}; torch {env.get('torch')}; "
           f"triton {env.get('triton')}; code {_code(record)}.", "",
           f"Precision path: {_precision_line(record)}.", "",
           "| ops | arch | batch | crops | AC | compile | img/s | step ms | MFU | peak GiB | plan GiB | plan error |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ops in OPS:
        run, plan = record["runs"].get(ops), record["plans"].get(ops)
        if run is None:
            out.append(f"| {ops} | - | - | - | - | - | not run (see the run's log) | - | - | - | "
                       f"{_f(plan and plan['total'] / GIB, '.2f')} | - |")
            continue
        g, loc, n = run["crops"]
        err = planner_error(record, ops)
        out.append(f"| {ops} | {run['arch']} | {run['batch']} | 2x{g} + {n}x{loc} | {run['ac']} | {run['compile']} | "
                   f"{_f(run['img_per_s'], '.1f')} | {_f(run['step_time_ms'], '.0f')} | "
                   f"{_f(run['mfu'] and 100 * run['mfu'], '.1f')} | {run['peak_mem_gib']:.2f} | "
                   f"{_f(plan and plan['total'] / GIB, '.2f')} | {_f(err if err is None else 100 * err, '+.1f')}"
                   f"{'' if err is None else '%'} |")
    profiles = [(ops, record["runs"][ops]["profile"]) for ops in OPS
                if (record["runs"].get(ops) or {}).get("profile")]
    if profiles:
        out += ["", "Profiled steps (torch.profiler, the run's last steps, not in the rates above):", ""]
        out += [f"- {ops}: " + format_summary(p, p["steps"]).replace("\n  ", "; ") for ops, p in profiles]
    out += _probe_table(record.get("ac_full") or {},
                        "Full AC at an equal batch (train.ac=full, a few eager steps; issue #7's memory goal "
                        "under full AC compares these peaks):")
    out += _probe_table(record.get("probe") or {},
                        "Batch probe (largest batch that trains; a few eager steps per batch, ascending, stops at "
                        "the first out-of-memory; its img/s is eager and warm-up bound, not comparable with the "
                        "rates above):")
    if record.get("missing"):
        out += ["", f"Missing from the run: {', '.join(record['missing'])}."]
    return out


def _probe_table(probe: dict[str, Any], title: str) -> list[str]:
    """A markdown table of a train_probe.py file's trials (none without trials)."""
    if not any(probe.get(ops) for ops in OPS):
        return []
    out = ["", title, "", "| ops | AC | batch | trains | peak GiB | plan GiB | img/s |", "|---|---|---|---|---|---|---|"]
    for ops in OPS:
        entry = probe.get(ops) or {}
        for t in entry.get("trials", []):
            out.append(f"| {ops} | {entry.get('ac', '-')} | {t['batch']} | "
                       f"{'yes' if t['ok'] else 'no: ' + str(t.get('error'))} | "
                       f"{_f(t.get('peak_mem_gib'), '.2f')} | {_f(t.get('plan_gib'), '.2f')} | "
                       f"{_f(t.get('img_per_s'), '.1f')} |")
    return out


def load_records(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """Committed records (benchmarks/results/train/*.json), sorted by file name."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("kind") != KIND:
            raise ValueError(f"{path}: not a train_check record (kind {data.get('kind')!r}); "
                             f"write one with tools/train_results.py OUT_DIR --save {path}")
        records.append((path.name, data))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="the folder train_check.sh wrote ($OUT)")
    parser.add_argument("--save", help="write the compact record here (e.g. benchmarks/results/train/NAME.json)")
    args = parser.parse_args(argv)
    record = build_record(args.out_dir)
    name = Path(args.save).name if args.save else Path(args.out_dir).name
    print("\n".join(record_lines(name, record)) + "\n")
    print("| issue | goal | preset | measured | status | run |\n|---|---|---|---|---|---|")
    print("\n".join(goal_rows([(name, record)])))
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(args.save, record)
        print(f"wrote {args.save}")
    return 0 if not record["missing"] else 1


if __name__ == "__main__":
    sys.exit(main())
