#!/usr/bin/env bash
# Validate egp_fast on a GPU machine in under 8 minutes, with no network:
#   1. build the extension in place (C++ + CUDA for this GPU's architecture),
#   2. run the GPU-relevant tests (then, with the time left at the end, the rest of the suite),
#   3. measure the device-to-device copy bandwidth (the yardstick for "fraction of copy"),
#   4. run the GPU benchmarks (each benchmark module separately, so one hang costs only itself),
#   5. write the JSON and a markdown report.
#
# Usage, from anywhere:   OUT=/path/to/out bash benchmarks/device_check.sh
# (DEVICE_CHECK_SKIP_BUILD=1 reuses an extension already built in the tree; DEVICE_CHECK_BUDGET
# changes the time budget in seconds, default 460; DEVICE_CHECK_TESTS="tests/a.py tests/b.py"
# replaces the list of GPU-relevant test files.)
# Needs python3 with torch (CUDA), triton, pytest, pytest-benchmark, hypothesis, ninja, pybind11.
#
# Files written under $OUT (8 at most, no subfolders):
#   device_check.log   the steps, their exit codes and times, the environment
#   build.log          the extension build
#   tests.log          pytest output (GPU-relevant tests, then the rest of the suite)
#   junit.xml          JUnit XML of the GPU-relevant tests
#   copy_bandwidth.json  device-to-device copy bandwidth (GB/s, bytes read + written)
#   bench.log          benchmark output
#   gpu_bench.json     pytest-benchmark JSON of the GPU run, stamped with the machine
#   BENCHMARKS_gpu.md  the report (tables, ratios, targets)
# Exit status: 0 when the build, the GPU tests and the benchmarks all passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

OUT="${OUT:-$ROOT/device_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LOG="$OUT/device_check.log"
BUDGET="${DEVICE_CHECK_BUDGET:-460}"   # seconds for all steps; the 8-minute limit minus slack
START=$(date +%s)
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTEST_ADDOPTS="-p no:cacheprovider"
: > "$LOG"

log() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# run_step NAME MAX_SECONDS LOGFILE CMD...: runs CMD under `timeout`, never past the budget.
FAILED=()
run_step() {
    local name="$1" max="$2" out="$3"
    shift 3
    local limit
    limit=$(left)
    if [ "$limit" -gt "$max" ]; then limit="$max"; fi
    if [ "$limit" -lt 10 ]; then
        log "SKIP $name: out of time"
        FAILED+=("$name(skipped)")
        return 124
    fi
    log "START $name (limit ${limit}s)"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >> "$out" 2>&1
    local rc=$?
    log "END $name rc=$rc in $(($(date +%s) - t0))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
    return $rc
}

# ---- environment ---------------------------------------------------------------------------
{
    echo "repo: $ROOT ($(git rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    nvidia-smi -L 2>&1 || echo "nvidia-smi: not found"
    command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not on PATH"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())'
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x $(nproc)"
} >> "$LOG" 2>&1

ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
if [ -n "$ARCH" ]; then
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"   # only this GPU: a faster build
else
    log "WARNING: torch sees no CUDA device; GPU tests and benchmarks will skip"
fi

# ---- 1. build ------------------------------------------------------------------------------
if [ "${DEVICE_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    log "SKIP build (DEVICE_CHECK_SKIP_BUILD=1): using the extension already in the tree"
else
    # The system g++, not Python's configured /opt/gcc one: an extension built with the latter
    # segfaulted on the H200 machine whenever an op raised an error (inside c10's formatting).
    run_step build 200 "$OUT/build.log" env CC=gcc CXX=g++ LDSHARED="g++ -shared" \
        "$PY" setup.py build_ext --inplace || FAILED+=(build)
fi
"$PY" -c 'import egp_fast, egp_fast._ext as e; print("extension: HAS_CPP", e.HAS_CPP, "HAS_CUDA", e.HAS_CUDA, "error", e.LOAD_ERROR); print("backends", egp_fast.available_backends())' 2>&1 | tee -a "$LOG"

# ---- 2. GPU-relevant tests -----------------------------------------------------------------
# Test files that mention CUDA or Triton (their GPU tests are marked requires_cuda/requires_triton).
if [ -n "${DEVICE_CHECK_TESTS:-}" ]; then
    read -r -a GPU_TESTS <<< "$DEVICE_CHECK_TESTS"
else
    mapfile -t GPU_TESTS < <(grep -l -E "cuda|triton|requires_ext" tests/*/test_*.py | sort)
fi
log "GPU-relevant test files: ${GPU_TESTS[*]}"
run_step gpu_tests 150 "$OUT/tests.log" "$PY" -m pytest -q -m "not slow" -rfEs "${GPU_TESTS[@]}" \
    --junitxml="$OUT/junit.xml" || FAILED+=(gpu_tests)
tail -3 "$OUT/tests.log" | tee -a "$LOG"

# ---- 3. copy bandwidth ---------------------------------------------------------------------
run_step copy_bandwidth 30 "$OUT/bench.log" "$PY" - "$OUT/copy_bandwidth.json" <<'EOF' || FAILED+=(copy_bandwidth)
import json, sys, torch
# Device-to-device copy of 1 GiB, median of 30 timed copies: GB/s counts bytes read + written.
src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
dst = torch.empty_like(src)
for _ in range(5):
    dst.copy_(src)
times = []
for _ in range(30):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); dst.copy_(src); b.record(); b.synchronize()
    times.append(a.elapsed_time(b) / 1e3)
t = sorted(times)[len(times) // 2]
res = {"GBps": 2 * src.numel() * src.element_size() / t / 1e9, "bytes": src.numel() * src.element_size(),
       "median_s": t, "device": torch.cuda.get_device_name()}
json.dump(res, open(sys.argv[1], "w"), indent=1)
print("copy bandwidth:", res)
EOF
grep "copy bandwidth" "$OUT/bench.log" | tee -a "$LOG"

# ---- 4. GPU benchmarks ---------------------------------------------------------------------
# One pytest per module (a hang costs only that module); "-k 'not cpu'" drops the CPU-only cases
# (bench_select's *_cpu, bench_e2e's [...-cpu]); the op modules switch to CUDA by themselves.
BENCH_FAIL=0
JSONS=()
for f in benchmarks/bench_*.py; do
    name=$(basename "$f" .py)
    run_step "$name" 120 "$OUT/bench.log" "$PY" -m pytest "$f" --benchmark-only -q -k "not cpu" \
        -o "python_files=bench_*.py" --benchmark-json="$SCRATCH/$name.json"
    rc=$?
    # 5: nothing selected (a CPU-only module) is fine.
    if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then BENCH_FAIL=1; FAILED+=("$name"); fi
    [ -s "$SCRATCH/$name.json" ] && JSONS+=(--json "$SCRATCH/$name.json")
done

# ---- 5. report -----------------------------------------------------------------------------
if [ ${#JSONS[@]} -gt 0 ]; then
    run_step report 30 "$OUT/bench.log" "$PY" benchmarks/report.py "${JSONS[@]}" --merge --stamp \
        --save-json "$OUT/gpu_bench.json" --copy-bandwidth "$OUT/copy_bandwidth.json" \
        --out "$OUT/BENCHMARKS_gpu.md" || FAILED+=(report)
    sed -n '/^## Targets/,/^## /p' "$OUT/BENCHMARKS_gpu.md" | head -20 >> "$LOG"
else
    log "no benchmark JSON was written"
    FAILED+=(report)
fi

# ---- 6. the rest of the test suite, with the time left ---------------------------------------
if [ "$(left)" -gt 40 ]; then
    run_step rest_of_tests $(($(left) - 5)) "$OUT/tests.log" "$PY" -m pytest -q -m "not slow" -rfE tests \
        $(printf -- '--ignore=%s ' "${GPU_TESTS[@]}") || log "rest of the suite: failures or cut short (see tests.log)"
    tail -3 "$OUT/tests.log" | tee -a "$LOG"
else
    log "SKIP rest_of_tests: $(left)s left"
fi

if [ ${#FAILED[@]} -eq 0 ]; then
    log "device_check: OK"
    exit 0
fi
log "device_check: FAILED steps: ${FAILED[*]}"
exit 1
