#!/usr/bin/env bash
# The whole GPU suite of issue 3 in one device call (nvidia-h200-x4 or -x2, ~9 minutes; WORLD= ranks for perf, default: every GPU):
#   0. install the carried wheels (.whl/*.whl: nvshmem4py, and pytest if it was carried) into /tmp/site
#   1. versions, GPUs, nvidia-smi topo -m
#   2. pytest tests/gpu (every test; each multi-process launch bounded by DWDP_TEST_TIMEOUT)
#   3. perf/gpu_copy_plane.py -> $OUT/gpu_copy_plane.json
#   4. one small multi-process test under compute-sanitizer --tool memcheck
#   5. a summary (step, exit code, seconds)
# Every step is time-boxed with `timeout` and the suite goes on after a failure. Logs and JSON land
# in $OUT (default ./gpu_suite_out). Budgets (seconds) can be overridden: T_PYTEST, T_PERF, T_SAN.
# Usage (repository root): bash perf/run_gpu_suite.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
mkdir -p "$OUT/logs"
T_PYTEST="${T_PYTEST:-220}"
T_PERF="${T_PERF:-180}"
T_SAN="${T_SAN:-90}"
START=$(date +%s)
SUMMARY=()

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
export DWDP_DEVICE_KIND="${DWDP_DEVICE_KIND:-nvidia-h200-x4}"
export DWDP_GIT_COMMIT="${DWDP_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
PY="${PYTHON:-python3}"

step() {  # step NAME SECONDS CMD...: run, log, record exit code and duration; never abort the suite
    local name="$1" secs="$2"; shift 2
    local t0=$(date +%s)
    echo "=== [$name] (time box ${secs}s): $*"
    timeout --kill-after=10 "$secs" "$@" > >(tee "$OUT/logs/$name.log") 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    [ $rc -eq 124 ] && echo "=== [$name] TIMED OUT after ${secs}s"
    echo "=== [$name] rc=$rc in ${dt}s"
    SUMMARY+=("$(printf '%-12s rc=%-4s %4ss' "$name" "$rc" "$dt")")
}

# 0. carried wheels (no network on the device machine; --no-deps: their needs are preinstalled)
if ls .whl/*.whl >/dev/null 2>&1; then
    step install 45 "$PY" -m pip install --quiet --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

# 1. what we run on
step info 40 bash -c "
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv; nvidia-smi topo -m
    uname -r; $PY - <<'EOF'
import importlib, platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, 'cuda', torch.version.cuda,
      '| GPUs', torch.cuda.device_count())
for m in ('cuda.bindings', 'cuda.core', 'cupy', 'nvshmem', 'pytest', 'pytest_timeout', 'numpy'):
    try:
        print(f'{m:16s}', getattr(importlib.import_module(m), '__version__', 'ok'))
    except Exception as exc:
        print(f'{m:16s} UNAVAILABLE: {type(exc).__name__}: {exc}')
import dwdp_comm.backends as b
for name in ('cuda_ipc', 'nvshmem'):
    print('probe', name, '->', b.probe(name) or 'usable')
EOF
    cat /proc/sys/kernel/yama/ptrace_scope 2>/dev/null | sed 's/^/yama ptrace_scope /'; id -u | sed 's/^/uid /'"

# 2. the GPU tests (every test runs: one failure must not hide the others)
TIMEOUT_ARGS=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout=200)
if "$PY" -c "import pytest" 2>/dev/null; then
    DWDP_TEST_TIMEOUT=150 step pytest "$T_PYTEST" "$PY" -m pytest tests/gpu -q -rA -p no:cacheprovider \
        "${TIMEOUT_ARGS[@]}" --junitxml="$OUT/pytest_gpu.xml"
else
    echo "=== [pytest] pytest is not installed: carry its wheels (pytest, pluggy, iniconfig, packaging) in .whl/"
    SUMMARY+=("pytest       MISSING")
fi

# 3. copy-plane performance (JSON for perf/results/)
step perf "$T_PERF" "$PY" perf/gpu_copy_plane.py --out "$OUT/gpu_copy_plane.json" --world-size "${WORLD:-$(nvidia-smi -L 2>/dev/null | wc -l)}" \
    --timeout $((T_PERF - 20))

# 4. one multi-process test under memcheck (every rank process is checked)
SAN="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
if [ -n "$SAN" ] && "$PY" -c "import pytest" 2>/dev/null; then
    DWDP_TEST_TIMEOUT=$((T_SAN - 15)) step memcheck "$T_SAN" "$SAN" --tool memcheck --report-api-errors no --target-processes all \
        --error-exitcode 99 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_backends.py \
        -k "test_pipeline_every_byte and cuda_ipc and round_robin"
else
    echo "=== [memcheck] skipped: compute-sanitizer ${SAN:-not found} / pytest missing"
    SUMMARY+=("memcheck     SKIPPED")
fi

# 5. summary (logs travel as one archive: the device tool returns at most 8 files)
{
    echo "==================== GPU suite summary ($(( $(date +%s) - START ))s total) ===================="
    printf '%s\n' "${SUMMARY[@]}"
    grep -E "[0-9]+ (passed|failed|skipped|errors?)" "$OUT/logs/pytest.log" 2>/dev/null | tail -1 | sed 's/^/pytest: /'
    grep -E "^(FAILED|ERROR) " "$OUT/logs/pytest.log" 2>/dev/null | head -20
    grep -E "single pair|memory/rank|overlap \[" "$OUT/logs/perf.log" 2>/dev/null
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/logs/memcheck.log" 2>/dev/null | tail -3 | sed 's/^/memcheck: /'
} | tee "$OUT/summary.txt"
tar czf "$OUT/gpu_suite_logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
