"""Generate BENCHMARKS.md (and one plot per run) from the committed runs in benchmarks/results/.

    python tools/benchmarks_md.py            # or: make benchmarks-md

Each results file is the JSON written by `dinov3-fast bench --json` (rows + meta: device, torch,
triton, measured roofline), usually by benchmarks/device_check.sh on a GPU machine. The goals of
the issues are listed in GOALS below; each is judged met / not met on the latest run that
measured it (earlier runs' figures beside it), or shown as not measured when no committed run
covers its preset. Issue #7's training goals come from the records in benchmarks/results/train/
(benchmarks/train_check.sh, then `tools/train_results.py OUT --save`); tools/train_results.py
defines and judges them. The memory planner's sweeps over one card (tools/plan_sweep.py, records
in benchmarks/results/plan/) follow the training records, marked as plans, then the attention
schedule sweeps (benchmarks/attention_sweep.py, records in benchmarks/results/attention_sweep/)
with their SDPA-route decisions.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import attention_sweep  # noqa: E402
import plan_sweep  # noqa: E402
import train_results  # noqa: E402
import torch  # noqa: E402

from dinov3_fast.bench.cases import all_cases  # noqa: E402
from dinov3_fast.bench.plot import plot_rows  # noqa: E402
from dinov3_fast.bench.roofline import Roofline  # noqa: E402
from dinov3_fast.bench.runner import HARNESS, BenchRow, flop_rate_unit, gbps_text, has_half_inputs, rates  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TRAIN_RESULTS = RESULTS / "train"
PLAN_RESULTS = RESULTS / "plan"
SWEEP_RESULTS = RESULTS / "attention_sweep"
DEVICE_LOGS = RESULTS / "device_logs"
# runs without meta["harness"] started before this commit's harness 2 landed (runner.HARNESS)
HARNESS_2_SINCE = "2026-11-27T03:28:15"
# which op a GPU test file checks, to mark figures of an op that failed a test in the same run
TEST_FILE_OPS = {"test_gram.py": "gram_loss", "test_koleo.py": "koleo_loss", "test_sinkhorn.py": "sinkhorn_knopp",
                 "test_soft_ce.py": "soft_cross_entropy", "test_linear_soft_ce.py": "linear_soft_cross_entropy",
                 "test_attention.py": "rope_attention", "test_rope.py": "apply_rope", "test_models.py": "vit_block"}
# the ops whose kernels an op's fused impl runs at the bench's presets: a failed test of one of them
# marks its figures too (the head loss is the soft-CE kernels on chunks of logits; the ViT blocks'
# fused attention is the rope_attention kernels at their 261- and 54-token crops)
RUNS_OPS = {"linear_soft_cross_entropy": ("soft_cross_entropy",), "vit_block": ("rope_attention",)}


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
    fused = group.get(goal.impl)
    if fused is None and "fused:kernels" not in (group.get("fused") or {}).get("note", ""):
        # a run from before the SDPA route, whose "fused" row was the kernels; a routed "fused" row
        # (its note names fused:kernels) times SDPA's backward, so it never stands in for them
        fused = group.get("fused")
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


# ----------------------------------------------------------------------------- what a run ran

@dataclass(frozen=True)
class RunInfo:
    """The code and checks behind one run's figures."""
    git: str | None           # revision (None: not recorded)
    dirty: bool | None        # the tree had uncommitted changes
    harness: int              # runner.HARNESS the run was timed with
    tests: str | None = None  # the GPU tests' summary line of the same device call
    failed: dict[str, list[str]] = field(default_factory=dict)  # op -> its failed GPU tests

    def failed_for(self, op: str) -> dict[str, list[str]]:
        """The failed GPU tests behind `op`'s figures: its own and those of the ops it runs, by op."""
        return {o: self.failed[o] for o in (op, *RUNS_OPS.get(op, ())) if o in self.failed}

    def code(self) -> str:
        """e.g. `ba113b1*, harness 1` (* = uncommitted changes)."""
        rev = "git unknown" if not self.git else self.git[:7] + ("*" if self.dirty else "")
        return f"{rev}, harness {self.harness}"


def run_info(path: Path, meta: dict, logs: Path = DEVICE_LOGS) -> RunInfo:
    """A run's RunInfo from its meta, or for runs that predate those fields, from the device call's
    logs (`<run id>_env.json`, `<run id>_pytest.log`, written by benchmarks/device_check.sh)."""
    run_id = _run_id(path)
    env_path = logs / f"{run_id}_env.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    git = meta.get("git") or env.get("git")
    dirty = meta.get("git_dirty") if meta.get("git") else env.get("git_dirty")
    harness = meta.get("harness") or (2 if meta.get("time", "") >= HARNESS_2_SINCE else 1)
    log_path = logs / f"{run_id}_pytest.log"
    tests, failed = None, {}
    if log_path.is_file():
        lines = log_path.read_text().splitlines()
        summary = [line.strip("= ") for line in lines if re.match(r"^=+ .*\b(passed|failed)\b.* in [\d.]+s", line)]
        tests = "; ".join(summary) if summary else None  # device_check.sh runs two sessions: parallel, serial
        sessions = sum(1 for line in lines if re.match(r"^=+ test session starts =+$", line))
        if tests and sessions > len(summary):  # a session killed at its time cap prints no summary
            tests += f" ({sessions - len(summary)} of {sessions} sessions ended without a summary: killed?)"
        for line in lines:
            hit = re.match(r"^(?:FAILED|ERROR) tests/(test_\w+\.py)::(\S+)", line)
            if hit:
                failed.setdefault(TEST_FILE_OPS.get(hit.group(1), hit.group(1)), []).append(hit.group(2))
    return RunInfo(git, dirty, harness, tests, failed)


@functools.lru_cache(maxsize=None)
def _current_cases() -> dict[tuple[str, str], tuple]:
    """(op, preset) -> (today's BenchCase, whether its inputs are half precision), for re-deriving
    committed rows; the inputs are built on the meta device (shapes and dtypes only)."""
    index = {}
    for case in all_cases():
        args, kwargs = case.make_inputs(torch.device("meta"))
        index[(case.op, case.preset)] = (case, has_half_inputs(args, kwargs))
    return index


def rederive(rows: list[dict], meta: dict) -> list[dict]:
    """Rows with their rate columns recomputed from their measured times by today's counts
    (runner.rates: FLOPs each impl executes, bytes, the matmul peak of the dtype it computes in)
    and the run's own roofline, so runs made under older conventions read alike. A row whose
    preset no longer exists keeps its recorded figures."""
    roofline = Roofline(**meta["roofline"]) if meta.get("roofline") else None
    out = []
    for row in rows:
        known = _current_cases().get((row["op"], row["preset"]))
        if known is None:
            out.append(row)
            continue
        case, half = known
        fwd_bwd = row["fwd_bwd_ms"] and row["fwd_bwd_ms"] / 1e3
        out.append({**row, **rates(case, row["impl"], half, row["fwd_ms"] / 1e3, fwd_bwd, roofline)})
    return out


def _goal_value(goal: Goal, value: float) -> str:
    """A goal's figure in its own unit: a ratio, TFLOP/s or a fraction of copy bandwidth."""
    if goal.metric in ("tflops", "bwd_tflops"):
        return train_results.figure_text(value, goal.threshold, digits=0) + " TFLOP/s"
    if goal.metric == "bw_frac":
        return train_results.figure_text(value, goal.threshold, scale=100, digits=0) + "%"
    return train_results.figure_text(value, goal.threshold) + "x"


INTRO = [
    "# Benchmarks", "",
    "Generated by `python tools/benchmarks_md.py` from the runs committed in `benchmarks/results/`",
    "(`--check` says whether this file is current). Every ratio compares implementations measured in",
    "the same run on the same machine. GPU runs also give absolute figures as a fraction of the card's",
    "roofline (copy bandwidth, dense bf16 and fp32 matmul rates), measured at the start of that run;",
    "CPU runs do too from 2026-11-28 (copy bandwidth and the fp32 matmul rate on the run's threads).",
    "",
    "How to read the figures:",
    "- **Which code.** Each run names its git revision (`*`: the tree had uncommitted changes) and",
    f"  its bench harness. Harness {HARNESS} (this code): per-call time as a caller waits for it (CUDA events",
    "  after a drained L2 flush), every output back-propagated, and, on a GPU, the device time of the",
    "  same pass replayed from a CUDA graph (`graph ms`; beside the goals as `device time`). Harness 1",
    "  (before commit 7b2ee96): triton's `do_bench`, which hid up to ~90 us of host time per call behind",
    "  the flush, and the crop-list / RoPE cases timed an added `cat` / sum; its small-shape ratios are",
    "  wall-clock and not comparable with harness 2's.",
    "- **Rates are re-derived** from each row's measured forward time with today's counts",
    "  (`dinov3_fast/bench/cases`: the FLOPs each impl executes, the op's bytes) and the run's own",
    "  roofline, so runs made under older counting conventions read alike. TFLOP/s, % peak, GB/s",
    "  and % bw are of the forward pass; speed-up is of forward+backward where the op has a backward.",
    "  % peak is of the matmul rate of the dtype the impl computes in (DINOv3's Gram and KoLeo",
    "  references upcast to fp32: their % is of the fp32 rate). GB/s divides the op's bytes by each",
    "  impl's time: its minimal traffic (inputs read once, outputs written once), except for",
    "  Sinkhorn-Knopp, whose bytes are the fused schedule's 7 reads + 1 write (issue #4 judges that",
    "  schedule; its goal shows the minimal traffic's fraction beside it). On a reference row GB/s is",
    "  an effective rate, not that impl's traffic. `bwd` rates (attention, head loss) are the",
    "  backward's useful FLOPs (attention 2.5x the forward's, the head loss 2x) over the fwd+bwd time",
    "  less the forward time (the forward timed without gradients).",
    "- **peak MiB** is the memory a call allocates above its live inputs: forward+backward (the",
    "  gradients it keeps included) where the op has a backward, else the forward.",
    "- **Tests.** A figure marked † comes from a run in which that op, or an op whose kernels its fused",
    "  impl runs (the soft-CE kernels for the head loss, the attention kernels for a ViT block), failed",
    "  at least one of its GPU tests (listed in the run's section).",
    "- **Earlier runs** beside a goal name their run and code: they may be other machines (a CPU goal",
    "  takes every CPU run), harnesses or trees than the run that judges it.",
]


def render(runs: list[tuple[Path, dict]], train: list[tuple[str, dict]] = (),
           plans: list[tuple[str, dict]] = (), sweeps: list[tuple[str, dict]] = (), logs: Path = DEVICE_LOGS) -> str:
    """BENCHMARKS.md from the op-benchmark runs, issue #7's training records, the planner's
    one-card sweeps and the attention schedule sweeps (each a (name, record)); `logs`: the device
    calls' env and pytest logs."""
    runs = [(path, {**run, "rows": rederive(run["rows"], run["meta"])}) for path, run in runs]
    infos = {path: run_info(path, run["meta"], logs) for path, run in runs}
    out = [*INTRO, "", "## Goals", "",
           "| issue | goal | preset | measured | status | run (code) |", "|---|---|---|---|---|---|"]
    for goal in GOALS:
        found = {}  # run id -> (order, value, file name, device-time ratio, minimal-traffic fraction, info);
        # a run's main file comes first
        for path, run in runs:
            if not _can_judge(goal, run["meta"]):
                continue
            value = evaluate(goal, run["rows"])
            if value is not None and _run_id(path) not in found:
                found[_run_id(path)] = (_run_order(path, run["meta"]), value, path.name,
                                        device_speedup(goal, run["rows"]), minimal_traffic_fraction(goal, run["rows"]),
                                        infos[path])
        if not found:
            out.append(f"| {goal.issue} | {goal.text} | {goal.preset} | - | not measured "
                       f"({'no CPU run covers it' if goal.device == 'cpu' else f'no {goal.device} run committed yet'})"
                       " | - |")
            continue

        def shown(value: float, info: RunInfo) -> str:
            return _goal_value(goal, value) + (" †" if info.failed_for(goal.op) else "")

        runs_in_order = sorted(found.values(), key=lambda v: v[0])
        _, value, name, device, minimal, info = runs_in_order.pop()  # the latest run judges: the newest code
        beside = []
        if device is not None:
            beside.append(f"device time: {device:.2f}x")
        elif goal.metric == "speedup" and goal.device != "cpu":
            beside.append("device time not measured")
        if minimal is not None:
            beside.append(f"minimal traffic: {100 * minimal:.0f}%")
        if runs_in_order:
            # each earlier figure names its run and code: they may be other machines (a CPU goal takes
            # any CPU run), other harnesses and other trees than the judged one
            beside.append("earlier runs: " + ", ".join(f"{shown(v[1], v[5])} in {v[0][2]} ({v[5].code()})"
                                                       for v in runs_in_order))
        met = value >= goal.threshold
        status = "met" if met else "not met"
        split = sum((v[1] >= goal.threshold) != met for v in runs_in_order)
        if split:
            status += f" ({split} of {len(runs_in_order)} earlier: {'not met' if met else 'met'})"
        measured = shown(value, info) + (f" ({'; '.join(beside)})" if beside else "")
        out.append(f"| {goal.issue} | {goal.text} | {goal.preset} | {measured} | {status} | {name} ({info.code()}) |")
    out += train_results.goal_rows(list(train))
    out += ["", "## Training (issue #7)", "",
            "ViT-L/16 at DINOv3's recipe (preset vitl16_h100), `--ops fused` against `--ops reference` at an equal",
            "batch in one run of benchmarks/train_check.sh, beside the memory planner's prediction; records in",
            "`benchmarks/results/train/`. MFU counts the backbone matmul FLOPs the GPU runs: stochastic depth's",
            "dropped images are not counted (records made before that rule keep the old figure as `mfu_all_blocks`).",
            "A record's verdicts hold for the code and precision path it names; a later trainer or planner",
            "needs a new record.", ""]
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
    out += ["", "## Attention schedules and the SDPA route (device sweeps)", "",
            "benchmarks/attention_sweep.py in device_check.sh; records in `benchmarks/results/attention_sweep/`.",
            "`ms`: device time (launches hidden), `wall ms`: as a caller waits. The decision applies the",
            "rule docs/architecture.md fixed before any sweep ran: per crop length, the fastest correct forward",
            "plus backward schedule against the SDPA route as training calls it."]
    if not sweeps:
        out += ["", "No device sweep committed yet."]
    for name, record in sweeps:
        out += attention_sweep.table_lines(name, record)
    for path, run in runs:
        out += _run_section(path, run, infos[path])
    return "\n".join(out) + "\n"


def _run_section(path: Path, run: dict, info: RunInfo) -> list[str]:
    """One run's provenance, its GPU tests and a table per op."""
    meta = run["meta"]
    cpu = meta.get("device_type") == "cpu"
    threads = f", {meta['threads']} threads" if cpu and meta.get("threads") else ""
    out = ["", f"## {path.stem}", "",
           f"Device: {meta.get('device')}{threads}; torch {meta.get('torch')}; triton {meta.get('triton')}; "
           f"date {meta.get('date', path.stem)}; code {info.code()}.", ""]
    if info.tests:
        failed = "; ".join(f"{op}: {', '.join(tests)}" for op, tests in info.failed.items())
        out += [f"GPU tests of the same device call: {info.tests}" + (f" (failed: {failed})." if failed else "."), ""]
    roof = meta.get("roofline")
    if roof and cpu:
        out += [f"Measured roofline: copy {roof['copy_bytes_per_s'] / 1e9:.1f} GB/s, fp32 matmul "
                f"{roof['fp32_flops_per_s'] / 1e9:.0f} GFLOP/s.", ""]
    elif roof:
        out += [f"Measured roofline: copy {roof['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
                f"{roof['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, fp32 {roof['fp32_flops_per_s'] / 1e12:.0f} TFLOP/s.", ""]
    out.append(f"![speed-ups]({path.stem}.png)")
    rate, scale = flop_rate_unit(r["tflops"] for r in run["rows"])
    graphs = any(r.get("graph_ms") is not None for r in run["rows"])
    for op in dict.fromkeys(r["op"] for r in run["rows"]):
        rows = [r for r in run["rows"] if r["op"] == op]
        bwd = any(r.get("bwd_tflops") for r in rows)  # the backward's own rate, where a goal judges it
        out += ["", f"### {op}", "",
                f"| preset | impl | fwd ms | fwd+bwd ms | peak MiB | speed-up | mem x | fwd {rate} | fwd % peak | "
                "fwd GB/s | fwd % bw |" + (f" bwd {rate} |" if bwd else "") + (" graph ms | graph x |" if graphs else ""),
                "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if bwd else "") + ("---|---|" if graphs else "")]
        for r in rows:
            out.append(
                f"| {r['preset']} | {r['impl']} | {_fmt(r['fwd_ms'], '.3f')} | {_fmt(r['fwd_bwd_ms'], '.3f')} | "
                f"{_fmt(r['peak_mb'], '.1f')} | {_fmt(r['speedup'], '.2f')} | {_fmt(r['mem_ratio'], '.1f')} | "
                f"{_fmt(r['tflops'] and scale * r['tflops'], '.1f')} | {_fmt(r['flops_frac'] and 100 * r['flops_frac'], '.0f')} | "
                f"{gbps_text(r['gbps'])} | {_fmt(r['bw_frac'] and 100 * r['bw_frac'], '.0f')} |"
                + (f" {_fmt(r.get('bwd_tflops') and scale * r['bwd_tflops'], '.1f')} |" if bwd else "")
                + (f" {_fmt(_graph_time(r), '.3f')} | {_fmt(r.get('graph_speedup'), '.2f')} |" if graphs else ""))
        notes = dict.fromkeys(r["note"] for r in rows if r["note"])
        out += [""] + [f"- {n}" for n in notes]
        for failed_op, tests in info.failed_for(op).items():
            out.append(f"- † {op} failed {len(tests)} GPU test(s) in this run: its figures may not be of a correct kernel."
                       if failed_op == op else
                       f"- † {op} runs {failed_op}, which failed {len(tests)} GPU test(s) in this run: its fused "
                       "figures may not be of a correct kernel.")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if BENCHMARKS.md differs from what the committed runs give")
    args = parser.parse_args(argv)
    runs = [(p, json.loads(p.read_text())) for p in sorted(RESULTS.glob("*.json"))]
    train = train_results.load_records(TRAIN_RESULTS) if TRAIN_RESULTS.is_dir() else []
    plans = [(p.stem, json.loads(p.read_text())) for p in sorted(PLAN_RESULTS.glob("*.json"))]
    sweeps = [(p.stem, json.loads(p.read_text())) for p in sorted(SWEEP_RESULTS.glob("*.json"))]
    text = render(runs, train, plans, sweeps)
    target = ROOT / "BENCHMARKS.md"
    if args.check:
        current = target.is_file() and target.read_text() == text
        print("BENCHMARKS.md is current" if current else "BENCHMARKS.md is stale: run python tools/benchmarks_md.py")
        return 0 if current else 1
    for path, run in runs:
        fields = BenchRow.__dataclass_fields__
        rows = [BenchRow(**{k: v for k, v in r.items() if k in fields}) for r in rederive(run["rows"], run["meta"])]
        plot_rows(rows, path.with_suffix(".png"), title=f"{run['meta'].get('device')} ({path.stem})")
    target.write_text(text)
    print(f"wrote BENCHMARKS.md from {len(runs)} run(s) and {len(train)} training record(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
