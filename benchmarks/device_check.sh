#!/usr/bin/env bash
# The one GPU-machine script for the ops: build with nvcc, run every GPU test, run the benchmarks
# with the baselines re-measured in the same run, and write JSON (card, driver, versions, git
# revision) to $OUT, in ONE device call:
#   device run (timeout_s 420): GIT_REV=<this checkout's HEAD> bash benchmarks/device_check.sh
# then here: `python tools/ingest_device_run.py <files_at>` files $OUT's bench*.json as
# benchmarks/results/<card>_torch<X.Y>_triton<X.Y>_<date>_run<N>[_compiled|_model].json, env.json and
# pytest.log under device_logs/, attn_sweep.json under attention_sweep/ (BENCHMARKS.md shows its
# rows and its SDPA-route decision), and regenerates BENCHMARKS.md.
#
# One wall-clock budget (DEVICE_CHECK_BUDGET_S, default 390 s: the call's limit minus 30 s) is cut
# into phases, each under `timeout` with what is left of it, most important first, so a slow phase
# costs the later ones, never the files already written:
#   env (<= 30 s) -> build (<= 150 s) -> GPU tests (<= 150 s, 8 processes; then the `serial` ones,
#   <= 60 s, alone on the GPU; both into pytest.log) -> op benches without the compiled
#   baselines (bench.json) -> the attention schedule sweep, forward and backward (<=
#   ATTN_SWEEP_CAP_S, default 60 s; benchmarks/attention_sweep.py, attn_sweep.json; its shapes in
#   priority order, ViT-L's N=261 and N=54 first: they decide the trainer's attention route, see
#   docs/architecture.md; it stops starting candidates 20 s before its time is up) -> the compiled
#   baselines at the presets whose goals name them (bench_compiled.json: Inductor compiles take
#   ~10 s per graph, too slow for every preset) -> the ViT block benches (bench_model.json). The
#   sweep came last until the fourteenth session; it moved ahead of the compiled baselines and the
#   block benches (goals of closed issues, measured by earlier runs) because, last, the ~270-320 s
#   the rest takes left it 10-60 s of gpu_session.sh's 330.
# A phase with under 20 s of the budget left is skipped and listed at the end; only a phase that
# ran and failed makes the exit status 1, except the sweep (informational: its failure or timeout
# is logged, not counted).
# Full logs go to $OUT as they are written (build.log, pytest.log, log.txt), the console shows
# their tails; $OUT holds 8 files at most (the device tool returns no more): env (with the
# extension's build and the backends), the three logs, the three bench JSONs and the sweep's
# (plots are drawn here by tools/benchmarks_md.py); the bench JSON is rewritten after every case,
# and the sweep's after every row, so a kill keeps the rows measured.
# The device image has no network: pip is never asked to fetch anything.
# On a machine without a GPU it still runs (dry run, DEVICE_CHECK_BUDGET_S=600 for the 2-core CPU):
# it builds, skips the GPU tests and benches the CPU presets, so the script itself is exercised.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
rm -f "$OUT"/*.tmp
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BUDGET="${DEVICE_CHECK_BUDGET_S:-390}"
status=0        # 1 if anything that ran failed; phases skipped for time are listed, not failures
skipped=()
exec 3>&1       # the console, for messages from phases whose output is redirected
step() { echo "== [$SECONDS s] $*" | tee -a "$OUT/log.txt"; }
# seconds a phase may take: its cap, cut to what is left of the budget (0 when spent)
left() { local l=$((BUDGET - SECONDS)); l=$(( l < $1 ? l : $1 )); echo $(( l < 0 ? 0 : l )); }
SKIPPED=254  # a sentinel no phase returns (pytest exits 3 on an INTERNALERROR, which must fail the run)
# run a phase under `timeout` (SIGKILL 10 s after SIGTERM: a process stuck in a CUDA call ignores
# TERM; exit 124 or 137 then); with under 20 s of the budget left it is skipped (exit $SKIPPED)
phase() {
  local cap=$1 t; shift; t=$(left "$cap")
  if [ "$t" -lt 20 ]; then
    step "skipped, ${t}s of the budget left: $*" >&3
    skipped+=("$*")
    return $SKIPPED
  fi
  timeout -k 10 "$t" "$@"
}
# judge a phase's exit code: 0 passes, $SKIPPED is listed, anything else fails the run
judge() {
  local name=$1 rc=$2
  [ "$rc" -eq 0 ] || [ "$rc" -eq "$SKIPPED" ] && return 0
  status=1
  step "$name exit $rc (124/137: timeout)"
}

step "environment"
phase 30 "$PY" -m dinov3_fast.bench.environment > "$OUT/env.json"
judge environment $?
cat "$OUT/env.json"

step "build (nvcc for sm_80;sm_90a when present)"
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
if command -v nvidia-smi > /dev/null && ! command -v nvcc > /dev/null; then
  step "nvcc not found although a GPU is present: the CUDA kernels are not built (their tests skip)"
  status=1
fi
phase 150 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
judge build $?
tail -15 "$OUT/build.log"
# the extension's build and the backends go into env.json (key "extension"): one file fewer
phase 30 "$PY" - "$OUT/env.json" <<'PYEOF'
import json, sys
import dinov3_fast
from dinov3_fast._ext import native
try:
    env = json.loads(open(sys.argv[1]).read())
except (OSError, ValueError):  # the environment phase failed or was skipped
    env = {}
env["extension"] = {"build": native().build_info() if native() else None, "backends": dinov3_fast.backends()}
open(sys.argv[1], "w").write(json.dumps(env, indent=1))
print(json.dumps(env["extension"]))
PYEOF
judge backends $?

step "GPU tests (pytest -m 'gpu and not serial', then -m 'gpu and serial' in one process)"
pytest_opts=(-v tests -p no:cacheprovider -rfE --durations=15)
# -v prints each result as it comes, so a phase killed at its cap still says which tests passed;
# no test may hang the phase
"$PY" -c "import pytest_timeout" 2> /dev/null && pytest_opts+=(--timeout=120)
parallel=()  # Triton's JIT compiles dominate: spread them over 8 of the 16 cores
"$PY" -c "import xdist" 2> /dev/null && parallel+=(-n 8)
phase 150 "$PY" -m pytest -m "gpu and not serial" "${pytest_opts[@]}" ${parallel[@]+"${parallel[@]}"} \
  > "$OUT/pytest.log" 2>&1
judge "GPU tests" $?
# timing tests that other processes' kernels would disturb (the `serial` marker), with the GPU alone;
# none selected (pytest's exit 5) is not a failure
phase 60 "$PY" -m pytest -m "gpu and serial" "${pytest_opts[@]}" >> "$OUT/pytest.log" 2>&1
rc=$?
[ "$rc" -eq 5 ] && rc=0
judge "serial GPU tests" $rc
tail -40 "$OUT/pytest.log"

bench() {  # bench NAME CAP ARGS...: one bench phase, its table into log.txt, rows into $OUT/NAME.json
  local name=$1 cap=$2; shift 2
  step "bench: $name ($*)"
  phase "$cap" "$PY" -m dinov3_fast.cli bench --min-run-time 0.2 --json "$OUT/$name.json" "$@" >> "$OUT/log.txt" 2>&1
  judge "bench $name (the cases measured are in $name.json)" $?
}
bench bench 600 --skip-impl reference+compile

# the attention's forward and backward schedules (no GPU: one line, nothing written); not counted
sweep_cap="${ATTN_SWEEP_CAP_S:-60}"
step "attention schedule sweep (benchmarks/attention_sweep.py, <= ${sweep_cap} s)"
sweep_budget=$(( $(left "$sweep_cap") - 20 ))
phase "$sweep_cap" "$PY" benchmarks/attention_sweep.py --json "$OUT/attn_sweep.json" \
  --budget-s $(( sweep_budget > 0 ? sweep_budget : 0 )) >> "$OUT/log.txt" 2>&1
rc=$?
[ "$rc" -eq 0 ] || [ "$rc" -eq "$SKIPPED" ] || step "attention schedule sweep exit $rc (124/137: timeout; not counted)"

if command -v nvidia-smi > /dev/null; then  # GPU presets only: a CPU dry run has none of these
  bench bench_compiled 600 --preset crop512_b16_d1024 --preset dino_teacher_7b
  bench bench_model 600 --model
fi

rm -f "$OUT"/*.tmp  # a kill mid-write leaves one; the result files themselves are always whole
step "summary"
"$PY" - "$OUT" <<'PYEOF' 2>&1 | tee -a "$OUT/log.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for path in sorted(out.glob("bench*.json")):
    report = json.loads(path.read_text())
    rows, failed = report["rows"], report["meta"].get("failed_cases", [])
    print(f"{path.name}: {len(rows)} rows" + (f", {len(failed)} failed cases:" if failed else ""))
    for failure in failed:
        print(f"  FAILED {failure}")
    for r in rows:
        if r["impl"].startswith("fused"):
            t = r["fwd_bwd_ms"] or r["fwd_ms"]
            print(f"  {r['op']:<20}{r['preset']:<30}{r['impl']:<14}{t:9.3f} ms  x{r['speedup']:.2f}")
sweep = out / "attn_sweep.json"
if sweep.exists():
    report = json.loads(sweep.read_text())
    print(f"{sweep.name}: {len(report['rows'])} rows, skipped for time: {report['skipped']}")
    for r in report["rows"]:
        got = (f"{r['ms']:9.3f} ms {r['tflops']:6.1f} TFLOP/s" + {None: "  no reference", True: "", False: "  WRONG"}[r["ok"]]
               if "ms" in r else r["error"][:60])
        print(f"  {r['shape']:<16}{r['candidate']:<36}{got}")
    for shape, d in report.get("decision", {}).items():
        print(f"  decision {shape}: " + ("no verdict, a pass is missing" if d["faster"] is None else
              f"fused {d['fused_ms']:.3f} ms, SDPA route {d['route_ms']:.3f} ms: {d['faster']}")
              + (" (partial: candidates skipped)" if d.get("partial") else ""))
PYEOF
[ ${#skipped[@]} -eq 0 ] || step "skipped for time: ${skipped[*]}"
step "done (status $status)"
exit $status
