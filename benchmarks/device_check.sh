#!/usr/bin/env bash
# The one GPU-machine script: build with nvcc, run every GPU test, run the benchmarks with the
# baselines re-measured in the same run, and write JSON (with card, driver, versions, git revision)
# to $OUT. Designed for one device call well inside 10 minutes:
#   device run: GIT_REV=<this checkout's HEAD> bash benchmarks/device_check.sh
# On a machine without a GPU it still runs (dry run): it builds, skips the GPU tests and benches the
# CPU presets, so the script itself is exercised in CI-like conditions.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
status=0
step() { echo "== $*" | tee -a "$OUT/log.txt"; }

step "environment"
"$PY" -m dinov3_fast.bench.environment > "$OUT/env.json" || status=1
cat "$OUT/env.json"

step "build (nvcc for sm_80;sm_90a when present)"
"$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee -a "$OUT/log.txt" || status=1
"$PY" -c "import dinov3_fast, json; from dinov3_fast._ext import native; print(json.dumps({'build': native().build_info() if native() else None, 'backends': dinov3_fast.backends()}))" \
  | tee "$OUT/backends.json" || status=1

step "GPU tests (pytest -m gpu)"
timeout 300 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -40 | tee -a "$OUT/log.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "benchmarks (baselines re-measured in the same run)"
timeout 240 "$PY" -m dinov3_fast.cli bench --min-run-time 0.2 --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>&1 \
  | tee -a "$OUT/log.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "done (status $status)"
exit $status
