#!/usr/bin/env bash
# One call on one GPU (nvidia-h100-x1 / nvidia-h200, 600 s): the GPU tests of what changed first, then
# the benchmarks of issues 23, 24 and 26. Each step is time-boxed (T_*=0 skips it); logs and JSON in $OUT.
#   bash perf/run_one_gpu.sh            (set DWDP_GIT_COMMIT: the device copy of the tree has no .git)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
box() { local name="$1" secs="$2"; shift 2; local t0=$(date +%s)
        timeout --kill-after=5 "$secs" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
        echo "=== $name rc=$rc $(( $(date +%s) - t0 ))s"; }
T=tests/gpu
# Opt-in diagnosis steps, first (T_DIAG, T_QUANT > 0): issue 24's 1K prefill (host split per layer,
# profile with copy directions) and issue 23's cuBLAS block-FP8 path (its tests, then its timing).
# Opt-in first step T_NEW (> 0): the kernels written without a GPU (now: the MXFP4 kernel's PTX
# decode; the block-FP8 kernel's one-scale tiles): their GPU tests, then their timings (every tile
# candidate, the Triton-ops decode too).
if [ "${T_NEW:-0}" != 0 ]; then
    box new_tests 150 python3 -m pytest -q -rs --tb=short -p no:cacheprovider -n 3 --dist loadfile $T/test_quant_gpu.py
    grep -sE "FAILED|ERROR|passed|failed" "$OUT/new_tests.log" | tail -12 | cut -c1-250
    box quant_mx "$T_NEW" python3 -m perf.bench_quant_experts --models gptoss --config-tokens 1024,4096,16384 \
        --profile-tokens 4096,16384 --json "$OUT/quant_experts_gptoss.json"
    grep -sE "^gptoss|^configs|^profile|WRONG|FAILED" "$OUT/quant_mx.log" | tail -20 | cut -c1-400
    box quant_fp8 "$T_NEW" python3 -m perf.bench_quant_experts --models deepseek --tokens 4096,16384 \
        --config-tokens 4096,16384 --profile-tokens 16384 --rounds 2 --json "$OUT/quant_experts_deepseek.json"
    grep -sE "^deepseek|^configs|^profile|WRONG|FAILED" "$OUT/quant_fp8.log" | tail -12 | cut -c1-400
fi
# Opt-in T_BIG (> 0): issue 24's last cell (DeepSeek-V3 experts at 64K tokens; the allocator's expandable
# segments let HF's float32 weighted sum fit on 80 GB) and issue 23's memory per rank at G=2 (cuda_ipc).
if [ "${T_BIG:-0}" != 0 ]; then
    box sizes_ds64k "$T_BIG" env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -m perf.bench_sizes --parts experts \
        --families deepseek_v3 --tokens 65536 --rounds 3 --block-ms 30 --graph-max-tokens 16384 \
        --json "$OUT/bench_sizes_experts_deepseek_v3_64k.json"
    grep -sE "T= *65536|ratio|WRONG|memory" "$OUT/sizes_ds64k.log" | tail -4 | cut -c1-250
    if [ "${T_QMEM:-240}" != 0 ]; then
        box quant_memory "${T_QMEM:-240}" python3 perf/quant_memory.py --world-size 2 --json "$OUT/quant_memory_cuda_ipc_g2.json"
        tail -14 "$OUT/quant_memory.log" | cut -c1-250
    fi
fi
if [ "${T_DIAG:-0}" != 0 ]; then
    box profile_model "$T_DIAG" python3 -m perf.profile_model --prefill 256,1024 --json "$OUT/profile_model.json"
    grep -sE "^T=|      " "$OUT/profile_model.log" | cut -c1-230
    box host_cost "$T_DIAG" python3 -m perf.host_cost --parts model --model-tokens 256,1024 --json "$OUT/host_cost.json"
    grep -s "model " "$OUT/host_cost.log" | cut -c1-250
fi
if [ "${T_QUANT:-0}" != 0 ]; then
    box cublas_tests 120 python3 -m pytest -q -rs --tb=short -p no:cacheprovider $T/test_quant_gpu.py -k cublas
    tail -6 "$OUT/cublas_tests.log" | cut -c1-250
    box quant "$T_QUANT" python3 -m perf.bench_quant_experts --models deepseek --tokens 4096,16384 --no-configs \
        --rounds 2 --json "$OUT/quant_experts.json"
    grep -sE "^deepseek|WRONG|FAILED" "$OUT/quant.log" | tail -12 | cut -c1-250
fi
# T_FILES: the GPU test files (default: every file of tests/gpu, changed areas first); T_TESTS=0 skips them
T_FILES="${T_FILES:-$T/test_quant_gpu.py $T/test_lean_gpu.py $T/test_slot_free_gpu.py $T/test_hf_gpu.py \
    $T/test_telemetry_gpu.py $T/test_graphs_gpu.py $T/test_experts_gpu.py $T/test_gpu_backends.py \
    $T/test_kernels_gpu.py $T/test_interop_gpu.py $T/test_faults_gpu.py}"
[ "${T_TESTS:-230}" != 0 ] && box gpu_tests "${T_TESTS:-230}" python3 -m pytest -v -rs --tb=short -p no:cacheprovider \
    --timeout 90 $T_FILES
grep -sE "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -12 | cut -c1-200
[ "${T_SIZES:-160}" != 0 ] && box bench_sizes "${T_SIZES:-160}" python3 -m perf.bench_sizes --rounds 3 --block-ms 30 ${SIZES_ARGS:-} --json "$OUT/bench_sizes.json"
tail -18 "$OUT/bench_sizes.log" 2>/dev/null
for g in "" "--cuda-graph"; do
    [ "${T_DS:-45}" = 0 ] && break
    box "deepseek${g:+_graph}" "${T_DS:-45}" python3 examples/deepseek_layer.py --mode dwdp --world-size 1 --layers 1 \
        --prompt-mean 4096 --iters 6 $g --json "$OUT/deepseek${g:+_graph}.json"
    tail -4 "$OUT/deepseek${g:+_graph}.log" | cut -c1-200
done
[ "${T_TEL:-45}" != 0 ] && box telemetry "${T_TEL:-45}" python3 -m perf.bench_telemetry --world-size 2 --tokens 2048 --rounds 2 --iters 5 \
    --out "$OUT/bench_telemetry.json" --trace "$OUT/trace.json"
tail -8 "$OUT/telemetry.log" 2>/dev/null | cut -c1-200
[ "${T_ADV:-30}" != 0 ] && box advise "${T_ADV:-30}" python3 -m dwdp_comm.bench.cli advise -m deepseek-v3 -g 4 --weights bf16 -t 8192 --cv 0.2 \
    --sweep 4096,8192 --measure yes --fabric auto --json "$OUT/advise_fabric_auto.json"
grep -si "fabric" "$OUT/advise.log" | head -3 | cut -c1-250
tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log) && rm -f "$OUT"/*.log
