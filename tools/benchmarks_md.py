"""Generate BENCHMARKS.md (and one plot per run) from the committed runs in benchmarks/results/.

    python tools/benchmarks_md.py            # or: make benchmarks-md

Each results file is the JSON written by `dinov3-fast bench --json` (rows + meta: device, torch,
triton, measured roofline), usually by benchmarks/device_check.sh on a GPU machine. The goals of
the issues are listed in GOALS below; each is judged met / not met on the latest run that
measured it (earlier runs' figures beside it), or shown as not measured when no committed run
covers its preset. Issue #7's training goals come from the records in benchmarks/results/train/
(benchmarks/train_check.sh, then `tools/train_results.py OUT --save`); tools/train_results.py
defines and judges them. The memory planner's sweeps over one card (tools/plan_sweep.py, records
in benchmarks/results/plan/) follow the training records, marked as plans.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import plan_sweep  # noqa: E402
import train_results  # noqa: E402
from dinov3_fast.bench.plot import plot_rows  # noqa: E402
from dinov3_fast.bench.runner import BenchRow  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TRAIN_RESULTS = RESULTS / "train"
PLAN_RESULTS = RESULTS / "plan"


@dataclass(frozen=True)
class Goal:
    issue: int
    op: str
    preset: str
    metric: str        # speedup | mem_ratio | tflops | bwd_tflops | bw_frac
    against: str       # impl name, "best" (fastest non-fused impl) or "" (absolute metrics)
    threshold: float
    device: str        # "cpu", or the GPU a run must have been made on ("H100"): which runs judge it
    text: str
    impl: str = "fused"  # the row judged; "fused:kernels" (the Triton kernels where default dispatch
                         # routes to SDPA) falls back to "fused" in runs from before the route


GOALS = (
    Goal(2, "gram_loss", "cpu_b4_p1024_d384", "speedup", "reference", 3.0, "cpu", "CPU fwd+bwd >= 3x reference"),
    Goal(2, "gram_loss", "cpu_b4_p1024_d384", "mem_ratio", "reference", 8.0, "cpu", "CPU peak memory >= 8x less"),
    Goal(2, "gram_loss", "crop512_b16_d1024", "speedup", "reference", 3.0, "H100", "H100 fwd+bwd >= 3x eager"),
    Goal(2, "gram_loss", "crop512_b16_d1024", "speedup", "reference+compile", 1.5, "H100", "H100 >= 1.5x compiled reference"),
    Goal(3, "koleo_loss", "cpu_n4096_d384", "speedup", "reference", 1.5, "cpu", "CPU fwd+bwd >= 1.5x reference"),
    Goal(3, "koleo_loss", "group_n16384_d1024", "speedup", "reference", 2.0, "H100", "H100 >= 2x eager"),
    Goal(4, "sinkhorn_knopp", "dino_teacher_7b", "speedup", "reference", 4.0, "H100", "H100 >= 4x eager"),
    Goal(4, "sinkhorn_knopp", "dino_teacher_7b", "speedup", "reference+compile", 1.5, "H100", "H100 >= 1.5x compiled"),
    Goal(4, "sinkhorn_knopp", "dino_teacher_7b", "bw_frac", "", 0.75, "H100", ">= 75% of copy bandwidth"),
    Goal(4, "soft_cross_entropy", "dino_student_7b", "speedup", "reference", 2.0, "H100", "H100 fwd+bwd >= 2x eager"),
    Goal(4, "soft_cross_entropy", "dino_student_7b", "mem_ratio", "reference", 2.0, "H100", ">= 2x less peak memory"),
    Goal(5, "rope_attention", "vitl_261tok", "speedup", "best", 1.25, "H100", "N=261 fwd+bwd >= 1.25x best SDPA path"),
    Goal(5, "rope_attention", "vitl_54tok", "speedup", "best", 1.25, "H100", "N=54 fwd+bwd >= 1.25x best SDPA path"),
    Goal(5, "rope_attention", "vit7b_4101tok", "tflops", "", 450.0, "H100", "N=4101 Dh=128 fwd >= 450 TFLOP/s",
         "fused:kernels"),
    Goal(5, "rope_attention", "vit7b_4101tok", "bwd_tflops", "", 300.0, "H100", "N=4101 Dh=128 bwd >= 300 TFLOP/s",
         "fused:kernels"),
    Goal(5, "rope_attention", "vit7b_4101tok", "speedup", "best", 0.9, "H100", "N=4101 >= 0.9x best SDPA backend",
         "fused:kernels"),
    Goal(6, "vit_block", "vitl_261tok", "speedup", "reference", 1.15, "H100", "ViT-L block >= 1.15x with fused ops"),
)


def _time(row: dict) -> float:
    """Per-call time of the pass a row is compared on (forward+backward where measured)."""
    return row["fwd_bwd_ms"] or row["fwd_ms"]


def _graph_time(row: dict) -> float | None:
    """The same pass's device time from the CUDA-graph replay; None where not captured (and in
    runs from before the harness measured it)."""
    return row.get("graph_ms")


def _compared(goal: Goal, rows: list[dict], time) -> tuple[dict | None, dict | None]:
    """(baseline row, fused row) of a goal in one run's rows; "best" is the baseline fastest by
    `time`, and only if every baseline has one."""
    group = {r["impl"]: r for r in rows if r["op"] == goal.op and r["preset"] == goal.preset}
    fused = group.get(goal.impl, group.get("fused"))
    if goal.against != "best":
        return group.get(goal.against), fused
    baselines = [r for name, r in group.items() if not name.startswith("fused")]
    best = min(baselines, key=time) if baselines and all(time(r) for r in baselines) else None
    return best, fused


def evaluate(goal: Goal, rows: list[dict]) -> float | None:
    """The goal's measured figure from one run's rows, or None if the run does not cover it."""
    base, fused = _compared(goal, rows, _time)
    if fused is None:
        return None
    if goal.metric in ("tflops", "bwd_tflops", "bw_frac"):
        return fused.get(goal.metric)
    if base is None:
        return None
    if goal.metric == "speedup":
        return _time(base) / _time(fused)
    return base["peak_mb"] / fused["peak_mb"] if base["peak_mb"] and fused["peak_mb"] else None


def device_speedup(goal: Goal, rows: list[dict]) -> float | None:
    """A speed-up goal's ratio on device time (the CUDA-graph replays), shown beside the judged
    figure: it says whether the kernels or the host decide; None where the run lacks the times."""
    if goal.metric != "speedup":
        return None
    base, fused = _compared(goal, rows, _graph_time)
    if base is None or fused is None or not _graph_time(base) or not _graph_time(fused):
        return None
    return _graph_time(base) / _graph_time(fused)


def minimal_traffic_fraction(goal: Goal, rows: list[dict]) -> float | None:
    """A bandwidth goal judged on a schedule's bytes: the fraction of copy bandwidth the minimal
    traffic (input read once, output written once) reaches, shown beside it, since re-reads that
    hit the L2 are not DRAM traffic; None elsewhere (and in runs from before the bench recorded it)."""
    if goal.metric != "bw_frac":
        return None
    _, fused = _compared(goal, rows, _time)
    return None if fused is None else fused.get("min_bw_frac")


def _can_judge(goal: Goal, meta: dict) -> bool:
    """A CPU goal takes CPU runs; a GPU goal takes runs on the card it names."""
    if goal.device == "cpu":
        return meta.get("device_type") == "cpu"
    return meta.get("device_type") == "cuda" and goal.device in meta.get("device", "")


def _run_id(path: Path) -> str:
    """One device call writes a main file and its `_compiled` / `_model` companions: one run, whose
    id is the main file's stem."""
    return path.stem.removesuffix("_compiled").removesuffix("_model")


def _run_order(path: Path, meta: dict) -> tuple[str, int, str]:
    """When a run was made, as a sort key: the start time of the file that judged the goal
    (`meta["time"]`, UTC ISO; older runs have only `meta["date"]`; a run's companion files start
    after its main file and before the next run), then its `_runN` number, then its id."""
    run_id = _run_id(path)
    number = re.search(r"_run(\d+)$", run_id)
    return meta.get("time") or meta.get("date", ""), int(number.group(1)) if number else 0, run_id


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(runs: list[tuple[Path, dict]], train: list[tuple[str, dict]] = (),
           plans: list[tuple[str, dict]] = ()) -> str:
    """BENCHMARKS.md from the op-benchmark runs, issue #7's training records and the planner's
    one-card sweeps (each a (name, record))."""
    out = ["# Benchmarks", "",
           "Generated by `python tools/benchmarks_md.py` from the runs committed in `benchmarks/results/`.",
           "Every ratio compares implementations measured in the same run on the same machine; GPU runs",
           "also give absolute figures and the fraction of the card's measured roofline (copy bandwidth,",
           "dense matmul rate), measured at the start of that run. Times are per call as a caller waits",
           "for it (CUDA events, L2 flushed); where a run also replayed the calls from a CUDA graph, the",
           "device-time ratio (no host time, L2 warm) stands beside the judged figure and in the graph",
           "columns.", "", "## Goals", "",
           "| issue | goal | preset | measured | status | run |", "|---|---|---|---|---|---|"]
    for goal in GOALS:
        found = {}  # run id -> (order, value, file name, device-time ratio, minimal-traffic fraction);
        # a run's main file comes first
        for path, run in runs:
            if not _can_judge(goal, run["meta"]):
                continue
            value = evaluate(goal, run["rows"])
            if value is not None and _run_id(path) not in found:
                found[_run_id(path)] = (_run_order(path, run["meta"]), value, path.name,
                                        device_speedup(goal, run["rows"]), minimal_traffic_fraction(goal, run["rows"]))
        if not found:
            out.append(f"| {goal.issue} | {goal.text} | {goal.preset} | - | not measured "
                       f"({'no CPU run covers it' if goal.device == 'cpu' else f'no {goal.device} run committed yet'})"
                       " | - |")
            continue
        runs_in_order = sorted(found.values())
        _, value, name, device, minimal = runs_in_order.pop()  # the latest run judges: it ran the current code
        beside = ([f"device time: {device:.2f}"] if device is not None else []) + \
            ([f"minimal traffic: {minimal:.2f}"] if minimal is not None else []) + \
            ([f"earlier runs: {', '.join(f'{v[1]:.2f}' for v in runs_in_order)}"] if runs_in_order else [])
        measured = f"{value:.2f}" + (f" ({'; '.join(beside)})" if beside else "")
        status = "met" if value >= goal.threshold else "not met"
        out.append(f"| {goal.issue} | {goal.text} | {goal.preset} | {measured} | {status} | {name} |")
    out += train_results.goal_rows(list(train))
    out += ["", "## Training (issue #7)", "",
            "ViT-L/16 at DINOv3's recipe (preset vitl16_h100), `--ops fused` against `--ops reference` at an equal",
            "batch in one run of benchmarks/train_check.sh, beside the memory planner's prediction; records in",
            "`benchmarks/results/train/`. MFU counts the backbone matmul FLOPs the GPU runs: stochastic depth's",
            "dropped images are not counted (records made before that rule keep the old figure as `mfu_all_blocks`).",
            ""]
    if not train:
        out.append("No GPU training run committed yet.")
    for i, (name, record) in enumerate(train):
        out += ([""] if i else []) + train_results.record_lines(name, record)
    for name, record in plans:
        out += ["", f"### What fits on one card, planned ({name}; not measured)", "",
                f"`python tools/plan_sweep.py` ({record['date']}, torch {record['torch']}, {record.get('git_rev')}): the "
                f"memory planner on the {record['preset']} recipe with the arch replaced. The card ({record['card']}) "
                f"is taken as {record['budget_gib']:g} GiB, an assumption that no run of the current trainer has "
                f"checked yet (the tool's docstring). Batches are multiples of {record['step']}; the plan is "
                "given at each batch.", "",
                *plan_sweep.table_lines(record)]
    for path, run in runs:
        meta = run["meta"]
        out += ["", f"## {path.stem}", "",
                f"Device: {meta.get('device')}; torch {meta.get('torch')}; triton {meta.get('triton')}; "
                f"date {meta.get('date', path.stem)}.", ""]
        roof = meta.get("roofline")
        if roof:
            out.append(f"Measured roofline: copy {roof['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
                       f"{roof['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, fp32 {roof['fp32_flops_per_s'] / 1e12:.0f} TFLOP/s.")
            out.append("")
        out.append(f"![speed-ups]({path.stem}.png)")
        ops = dict.fromkeys(r["op"] for r in run["rows"])
        graphs = any(r.get("graph_ms") is not None for r in run["rows"])
        for op in ops:
            out += ["", f"### {op}", "",
                    "| preset | impl | fwd ms | fwd+bwd ms | peak MiB | speed-up | mem x | TFLOP/s | % peak | GB/s | % bw |"
                    + (" graph ms | graph x |" if graphs else ""),
                    "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if graphs else "")]
            for r in (r for r in run["rows"] if r["op"] == op):
                out.append(
                    f"| {r['preset']} | {r['impl']} | {_fmt(r['fwd_ms'], '.3f')} | {_fmt(r['fwd_bwd_ms'], '.3f')} | "
                    f"{_fmt(r['peak_mb'], '.1f')} | {_fmt(r['speedup'], '.2f')} | {_fmt(r['mem_ratio'], '.1f')} | "
                    f"{_fmt(r['tflops'], '.1f')} | {_fmt(r['flops_frac'] and 100 * r['flops_frac'], '.0f')} | "
                    f"{_fmt(r['gbps'], '.0f')} | {_fmt(r['bw_frac'] and 100 * r['bw_frac'], '.0f')} |"
                    + (f" {_fmt(_graph_time(r), '.3f')} | {_fmt(r.get('graph_speedup'), '.2f')} |" if graphs else ""))
            notes = dict.fromkeys(r["note"] for r in run["rows"] if r["op"] == op and r["note"])
            out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def main() -> int:
    runs = [(p, json.loads(p.read_text())) for p in sorted(RESULTS.glob("*.json"))]
    for path, run in runs:
        fields = BenchRow.__dataclass_fields__
        rows = [BenchRow(**{k: v for k, v in r.items() if k in fields}) for r in run["rows"]]
        plot_rows(rows, path.with_suffix(".png"), title=f"{run['meta'].get('device')} ({path.stem})")
    train = train_results.load_records(TRAIN_RESULTS) if TRAIN_RESULTS.is_dir() else []
    plans = [(p.stem, json.loads(p.read_text())) for p in sorted(PLAN_RESULTS.glob("*.json"))]
    (ROOT / "BENCHMARKS.md").write_text(render(runs, train, plans))
    print(f"wrote BENCHMARKS.md from {len(runs)} run(s) and {len(train)} training record(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
