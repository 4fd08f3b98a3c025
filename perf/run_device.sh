#!/usr/bin/env bash
# Everything GPU-side, in two device calls of under 10 minutes each (nvidia-h200-x2 or larger):
#
#   bash perf/run_device.sh copy      # GPU tests, copy-plane perf, contention CLI, memcheck
#   bash perf/run_device.sh compute   # grouped GEMM benchmark (one GPU), DeepSeek DWDP vs DEP sweep
#   bash perf/run_device.sh session   # one GPU: GPU suite, fault tests + sanitizer, HF example, advisor validation
#
# Each step is time-boxed and the script goes on after a failure; a summary line per step (exit
# code, seconds) is printed last. Results (JSON, PNG) and one log archive land in $OUT (at most 8
# files come back from the device tool). Carry .whl (nvshmem4py-cu13 wheel) with the call.
set -u
cd "$(dirname "$0")/.."
PART="${1:-copy}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT/logs"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export DWDP_DEVICE_KIND="${DWDP_DEVICE_KIND:-nvidia-h200-x$(nvidia-smi -L 2>/dev/null | wc -l)}"
export DWDP_GIT_COMMIT="${DWDP_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
G=$(nvidia-smi -L 2>/dev/null | wc -l)
START=$(date +%s)
DEADLINE=$(( START + ${BUDGET:-570} ))  # the device call's limit is 600 s: keep time to pack the logs
SUMMARY=()

step() {  # step NAME SECONDS CMD...: run with a time box, log, record exit code and duration
    local name="$1" secs="$2"; shift 2
    if [ -n "${STEPS:-}" ] && [[ ",$STEPS," != *",$name,"* ]]; then return; fi  # STEPS=a,b runs only those
    local t0=$(date +%s)
    local left=$(( DEADLINE - t0 - 15 ))
    if [ "$left" -lt 20 ]; then
        SUMMARY+=("$(printf '%-14s SKIPPED (no time left)' "$name")"); return
    fi
    [ "$secs" -gt "$left" ] && secs=$left
    echo "=== [$name] (${secs}s box): $*"
    timeout --kill-after=10 "$secs" "$@" > "$OUT/logs/$name.log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    tail -n "${TAILN:-15}" "$OUT/logs/$name.log"
    SUMMARY+=("$(printf '%-14s rc=%-4s %4ss' "$name" "$rc" "$dt")")
}

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT/logs/install.log" 2>&1 || echo "=== wheel install failed (see logs/install.log)"
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
BENCH="python3 -m dwdp_comm.bench.cli"

{ nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  nvidia-smi topo -m; uname -r; python3 - <<'EOF'
import importlib, platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, 'cuda', torch.version.cuda, '| GPUs',
      torch.cuda.device_count())
for m in ('cuda.bindings', 'cuda.core', 'cupy', 'nvshmem', 'numba', 'numba_cuda', 'numpy', 'pytest'):
    try:
        print(f'{m:14s}', getattr(importlib.import_module(m), '__version__', 'ok'))
    except Exception as exc:
        print(f'{m:14s} UNAVAILABLE: {type(exc).__name__}: {exc}')
EOF
} > "$OUT/logs/info.log" 2>&1
head -40 "$OUT/logs/info.log"

if [ "$PART" = copy ]; then
    step pytest_gpu "${T_PYTEST:-230}" python3 -m pytest tests/gpu -q -rs -p no:cacheprovider \
        --timeout=200 --junitxml="$OUT/logs/pytest_gpu.xml"
    TAILN=12 step copy_plane "${T_PERF:-150}" python3 -m perf.gpu_copy_plane --out "$OUT/gpu_copy_plane.json" \
        --world-size "$G" --timeout 130
    TAILN=40 step contention "${T_CONT:-110}" $BENCH contention --backend cuda_ipc -b 256M -e 1G -f 4 --chunk 0,8M,64M \
        -s parallel,naive,rotated,round_robin,batch,tdm -p pair,full -n 5 -w 1 \
        --json "$OUT/contention.json" --plot "$OUT/contention.png"
    TAILN=20 step contention_skew "${T_SKEW:-60}" $BENCH contention --backend cuda_ipc -b 1G -e 1G --chunk 0,8M \
        -s parallel,round_robin,batch,tdm -p full --skew random -n 5 -w 1 --json "$OUT/contention_skew.json"
    TAILN=20 step contention_nvshmem "${T_NVS:-50}" $BENCH contention --backend nvshmem -b 1G -e 1G --chunk 0,8M \
        -s parallel,batch,tdm -p pair,full -n 5 -w 1 --json "$OUT/contention_nvshmem.json"
    SAN="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
    if [ -n "$SAN" ]; then
        DWDP_TEST_TIMEOUT=70 TAILN=8 step memcheck "${T_SAN:-90}" "$SAN" --tool memcheck --report-api-errors no \
            --target-processes all --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider \
            tests/gpu/test_gpu_backends.py -k "test_pipeline_every_byte and cuda_ipc and round_robin"
    fi
elif [ "$PART" = compute ]; then
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    sweep() {  # sweep NAME SECONDS WEIGHTS
        TAILN=40 step "$1" "$2" python3 -m perf.sweep_deepseek --means "${MEANS:-4096,8192,16384,32768}" \
            --cvs "${CVS:-0,0.2,0.4}" --weights "$3" --layers 4 --iters "${ITERS:-3}" \
            --prefetch-gbps "${PREFETCH_GBPS:-390}" --timeout "$(( $2 / 2 - 10 ))" \
            --json "$OUT/deepseek_sweep_$3.json" --plot "$OUT/deepseek_sweep_$3.png"
    }
    sweep sweep_bf16 "${T_SWEEP:-260}" bf16
    TAILN=30 CUDA_VISIBLE_DEVICES=0 step grouped_gemm "${T_GEMM:-240}" python3 -m perf.bench_grouped_gemm \
        --json "$OUT/grouped_gemm.json" ${GEMM_ARGS:-}
    sweep sweep_fp8 "${T_SWEEP8:-260}" fp8
elif [ "$PART" = session ]; then
    # One H200 is enough: the GPU suite (multi-rank tests share the GPU), the fault tests under
    # compute-sanitizer, the HF example on cuda_ipc, the HF experts benchmark and the advisor validation.
    # Together they can outrun one 600 s call: steps past the deadline are skipped and listed.
    step pytest_gpu "${T_PYTEST:-200}" python3 -m pytest ${GPU_TESTS:-tests/gpu} -q -rs \
        -p no:cacheprovider --timeout=180 --junitxml="$OUT/logs/pytest_gpu.xml"
    # CUDA graphs: the example captured and replayed (checks itself), then eager vs graph timings
    TAILN=20 step graphs_example "${T_GREX:-90}" python3 examples/deepseek_layer.py --size toy --world-size 2 --layers 3 \
        --cuda-graph
    TAILN=40 step graphs_bench "${T_GRB:-200}" python3 -m perf.bench_graphs --out "$OUT/bench_graphs_h200.json"
    [ -f perf/run_faults_gpu.sh ] && TAILN=20 step faults_gpu "${T_FAULTS:-120}" env OUT="$OUT" bash perf/run_faults_gpu.sh
    [ -f examples/hf_moe.py ] && TAILN=25 step hf_example "${T_HF:-90}" python3 examples/hf_moe.py --model mixtral \
        --backend cuda_ipc --world-size 2 --json "$OUT/hf_moe_h200.json"
    TAILN=25 step hf_graph "${T_HFG:-90}" python3 examples/hf_moe.py --model qwen3_moe --backend cuda_ipc --world-size 2 \
        --cuda-graph --json "$OUT/hf_moe_graph_h200.json"
    TAILN=40 step hf_memory "${T_HFM:-240}" python3 -m perf.hf_memory --world-size 2 --layers 2 \
        --json "$OUT/hf_memory_cuda_ipc_h200.json"
    TAILN=12 step profile_experts "${T_PROF:-60}" python3 -m perf.profile_experts --out "$OUT/profile_experts.txt"
    [ -f perf/bench_hf_experts.py ] && TAILN=40 step hf_experts "${T_HFX:-240}" python3 -m perf.bench_hf_experts \
        --json "$OUT/hf_experts_h200.json" ${HFX_ARGS:-}
    # advise's predictions with compute measured on this GPU (prefetch and all-to-all still modelled)
    TAILN=30 step advise_measured "${T_ADVM:-200}" bash -c 'for g in 4 8; do for w in bf16 fp8; do
        '"$BENCH"' advise -m deepseek-v3 -g $g --weights $w -t 8192 --cvs 0,0.2,0.4 --sweep 4096,8192,16384,32768 \
            --measure yes --fabric h200 --json "$OUT/advise_measured_h200x${g}_$w.json" || exit 1; done; done
        for w in bf16 fp8; do '"$BENCH"' advise -m deepseek-v3 -g 72 --weights $w -t 8192 --cvs 0,0.2,0.4 \
            --sweep 4096,8192,16384,32768 --measure yes --fabric nvl72 --json "$OUT/advise_measured_nvl72_$w.json" || exit 1; done'
    # the NVL72-like rows alone (advise_measured runs them last; this step fits a short call)
    TAILN=20 step advise_nvl72 "${T_ADVN:-200}" bash -c 'for w in bf16 fp8; do '"$BENCH"' advise -m deepseek-v3 -g 72 \
        --weights $w -t 8192 --cvs 0,0.2,0.4 --sweep 4096,8192,16384,32768 --measure yes --fabric nvl72 \
        --json "$OUT/advise_measured_nvl72_$w.json" || exit 1; done'
    [ -f perf/validate_advise.py ] && TAILN=30 step advise_validate "${T_ADV:-240}" python3 -m perf.validate_advise \
        compute --means 2048,4096,8192 --json "$OUT/advise_compute_h200.json"
else
    echo "usage: bash perf/run_device.sh copy|compute|session"; exit 2
fi

echo "==================== device run ($PART, $(( $(date +%s) - START ))s, commit $DWDP_GIT_COMMIT) ===================="
printf '%s\n' "${SUMMARY[@]}"
tar czf "$OUT/logs_$PART.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
ls -la "$OUT"
