#!/usr/bin/env bash
# One device call for everything GPU-side (on nvidia-h200-x2 / -x4):
#   1. perf/run_gpu_suite.sh (GPU backend tests, copy-plane perf, memcheck)
#   2. kernel tests on the GPU and perf/bench_grouped_gemm.py (one GPU)
#   3. examples/deepseek_layer.py smoke: DWDP and DEP at real size, 2 layers, with the reference check
# Every step is time-boxed; results land in $OUT (logs as one archive).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
export OUT
T_SUITE="${T_SUITE:-300}" T_KERN="${T_KERN:-150}" T_EX="${T_EX:-100}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT/logs2"
timeout --kill-after=10 "$T_SUITE" bash perf/run_gpu_suite.sh > "$OUT/logs2/suite.log" 2>&1
echo "=== suite rc=$?"; grep -A30 "GPU suite summary" "$OUT/logs2/suite.log"
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
timeout --kill-after=10 "$T_KERN" bash -c "python3 -m pytest tests/test_kernels_gpu.py -q -rs -p no:cacheprovider 2>&1 | tail -25; \
    CUDA_VISIBLE_DEVICES=0 python3 perf/bench_grouped_gemm.py --skip-per-expert" > "$OUT/logs2/kernels.log" 2>&1
echo "=== kernels rc=$?"; tail -45 "$OUT/logs2/kernels.log"
G=$(nvidia-smi -L | wc -l)
for mode in dwdp dep; do
    timeout --kill-after=10 "$T_EX" python3 examples/deepseek_layer.py --mode $mode --world-size "$G" --layers 2 \
        --prompt-mean 4096 --cv 0.2 --iters 2 --json "$OUT/deepseek_$mode.json" > "$OUT/logs2/example_$mode.log" 2>&1
    echo "=== example $mode rc=$?"; tail -8 "$OUT/logs2/example_$mode.log"
done
tar czf "$OUT/round_logs.tgz" -C "$OUT" logs2 && rm -rf "$OUT/logs2"
ls "$OUT"
