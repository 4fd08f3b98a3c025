#!/usr/bin/env bash
# GPU fault tests (tests/gpu/test_faults_gpu.py) plus a compute-sanitizer memcheck pass over them.
# Writes $OUT/faults_gpu.log, $OUT/faults_gpu_sanitizer.log and $OUT/faults_gpu.json (exit codes,
# pass/fail counts, seconds, sanitizer error count). Usage: OUT=/some/dir bash perf/run_faults_gpu.sh
# Boxes: TESTS_BOX (default 110 s; the tests took 64 s on one H200 before the nvshmem/write-detection
# cases were added) + SANITIZER_BOX (default 160 s) fit in ~280 s with the report.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
T0=$(date +%s)
timeout --kill-after=10 "${TESTS_BOX:-110}" python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_faults_gpu.py \
    > "$OUT/faults_gpu.log" 2>&1
RC=$?
T1=$(date +%s)
SAN_RC=-1
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
    # Every rank process is a child of pytest: --target-processes all follows them. API errors are
    # not reported: cuda.bindings probes cuGetProcAddress_v2 with names the driver lacks (~100
    # harmless CUDA_ERROR_INVALID_VALUE lines); memory errors still fail the run (--error-exitcode).
    timeout --kill-after=10 "${SANITIZER_BOX:-160}" "$SAN" --tool memcheck --target-processes all --report-api-errors no \
        --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_faults_gpu.py \
        -k "views or commit" > "$OUT/faults_gpu_sanitizer.log" 2>&1
    SAN_RC=$?
else
    echo "compute-sanitizer not found" > "$OUT/faults_gpu_sanitizer.log"
fi
T2=$(date +%s)
python3 - "$OUT" "$RC" "$SAN_RC" "$((T1 - T0))" "$((T2 - T1))" <<'PY'
import json, os, re, subprocess, sys, datetime
out, rc, san_rc, t_tests, t_san = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def counts(path):
    text = open(path, errors="replace").read()
    got = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", text)}
    return got, text
tests, _ = counts(f"{out}/faults_gpu.log")
san, stext = counts(f"{out}/faults_gpu_sanitizer.log")
m = re.findall(r"ERROR SUMMARY: (\d+) error", stext)
commit = os.environ.get("DWDP_GIT_COMMIT")  # the device tree's .git may be stale: the caller names the commit
if not commit:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except Exception:
        commit = ""
doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
       "tests": {"rc": rc, "counts": tests, "seconds": t_tests},
       "sanitizer": {"rc": san_rc, "counts": san, "seconds": t_san, "error_summaries": [int(x) for x in m]}}
json.dump(doc, open(f"{out}/faults_gpu.json", "w"), indent=1)
print(json.dumps(doc, indent=1))
PY
tail -n 25 "$OUT/faults_gpu.log"
