"""Probe: which block-FP8 GEMM engine can carry DeepSeek-V3 experts at large token counts.

A diagnosis tool, not a benchmark of record (``perf/bench_quant_experts.py`` is that). At DeepSeek-V3
expert shapes (E=256, gate-up N=4096 K=7168, down N=7168 K=2048), for ``--rows`` rows per expert,
GEMM time only (activations already quantized and grouped), CUDA events over ``--reps`` calls:

- ``triton``: :func:`dwdp_comm.kernels.triton_quant.fp8_block_gemm` with its chosen config and the
  large-regime candidates;
- ``cublas_loop``: one ``torch._scaled_mm`` per expert (cuBLAS, DeepSeek recipe: 1x128 activation
  and 128x128 weight scales, Hopper), rows per expert rounded to a multiple of 4 (cuBLAS needs the
  activation scales' leading dimension 16-byte aligned); also its host time per loop;
- ``bf16``: ``torch._grouped_mm`` on bf16 weights of the same shape (the baseline the issue names).

Also checks one expert of ``cublas_loop`` against the dequantized float reference, and records whether
``_scaled_mm`` accepts rows that are not a multiple of 4.
Usage: python3 -m perf.probe_fp8_block [--rows 128,512] [--reps 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import time

import torch

from dwdp_comm.bench import record
from dwdp_comm.kernels import triton_quant


def log(*a) -> None:
    print(*a, flush=True)


def timed(fn, reps: int) -> tuple[float, float]:
    """(GPU ms per call, host ms per call) over ``reps`` back-to-back calls after one warm-up."""
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    host = (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps, host * 1e3


def scaled_mm(a, b, sa, sb):
    """cuBLAS block-scaled fp8 GEMM: ``a`` [M, K] row-major, ``b`` [K, N] column-major, ``sa`` [M, K/128]
    column-major, ``sb`` [K/128, N/128] column-major (float32)."""
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def probe_gemm(name: str, n: int, k: int, e: int, rows: int, reps: int, dev, out: list) -> None:
    f8 = torch.float8_e4m3fn
    m = e * rows
    wb = torch.randn(e, n, k, device=dev, dtype=torch.bfloat16)  # bf16 first: float32 would be 30 GB
    w = wb.to(f8)
    ws = torch.rand(e, n // 128, k // 128, device=dev) * 0.01 + 0.001
    xb = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    xq = xb.to(f8)
    xs = torch.rand(k // 128, m, device=dev) * 0.02 + 0.001  # group-major, as quantize_act writes
    offs = (torch.arange(1, e + 1, device=dev, dtype=torch.int32) * rows)
    flops = 2.0 * m * n * k
    res = dict(gemm=name, n=n, k=k, experts=e, rows_per_expert=rows)
    chosen = triton_quant.choose_config("fp8_block", rows, n, k)
    cands = {chosen.name: chosen}
    for c in triton_quant.CANDIDATES["fp8_block"]["large"] + triton_quant.CANDIDATES["fp8_block"]["medium"]:
        cands.setdefault(c.name, c)
    for cname, c in cands.items():
        try:
            ms, _ = timed(lambda c=c: triton_quant.fp8_block_gemm(xq, xs, [(0, w)], ws, offs, config=c), reps)
            res[f"triton_{cname}_ms"] = ms
            res[f"triton_{cname}_tflops"] = flops / ms / 1e9
        except Exception as exc:  # a config that does not build here is a finding, not a stop
            res[f"triton_{cname}_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    res["triton_chosen"] = chosen.name
    # cuBLAS per expert: activation scales per expert, column-major [rows, K/128] (a copy made once)
    r4 = -(-rows // 4) * 4
    xq4 = torch.randn(e * r4, k, device=dev, dtype=torch.bfloat16).to(f8)
    sa = [torch.rand(k // 128, r4, device=dev).add_(1e-3).t() for _ in range(e)]  # [r4, K/128], stride [1, r4]
    sb = [ws[i].t() for i in range(e)]  # [K/128, N/128], stride [1, K/128]
    bt = [w[i].t() for i in range(e)]   # [K, N] column-major
    xa = [xq4[i * r4:(i + 1) * r4] for i in range(e)]
    outs = [torch.empty(r4, n, device=dev, dtype=torch.bfloat16) for _ in range(e)]

    def loop():
        for i in range(e):
            outs[i] = scaled_mm(xa[i], bt[i], sa[i], sb[i])
    try:
        ms, host = timed(loop, reps)
        res.update(cublas_loop_ms=ms, cublas_loop_host_ms=host, cublas_loop_tflops=2.0 * e * r4 * n * k / ms / 1e9,
                   cublas_rows=r4)
        # correctness of one expert against the dequantized reference (float32)
        i = 3
        ref = (xa[i].float() * sa[i].repeat_interleave(128, 1)) @ \
              (w[i].float() * ws[i].repeat_interleave(128, 0).repeat_interleave(128, 1)).t()
        got = scaled_mm(xa[i], bt[i], sa[i], sb[i]).float()
        res["cublas_rel_err"] = float((got - ref).norm() / ref.norm())
    except Exception as exc:
        res["cublas_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:  # rows not a multiple of 4
        r = 6
        a6 = xq4[:r]
        s6 = torch.rand(k // 128, r, device=dev).add_(1e-3).t()
        scaled_mm(a6, bt[0], s6, sb[0])
        torch.cuda.synchronize()
        res["cublas_rows6"] = "ok"
    except Exception as exc:
        res["cublas_rows6"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    # bf16 grouped baseline
    ms, _ = timed(lambda: torch._grouped_mm(xb, wb.transpose(1, 2), offs=offs), reps)
    res.update(bf16_grouped_ms=ms, bf16_grouped_tflops=flops / ms / 1e9)
    out.append(res)
    best = min((v, key) for key, v in res.items() if key.endswith("_ms") and "host" not in key)
    log(f"{name} rows/expert={rows}: " + ", ".join(f"{kk}={v:.3f}" for kk, v in res.items()
                                                   if kk.endswith("_ms") or kk.endswith("tflops"))
        + f" | best {best[1]} | {res.get('cublas_error', '')} rows6={res.get('cublas_rows6')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="128,512")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        log("needs a CUDA GPU")
        return 2
    dev = torch.device("cuda")
    out: list = []
    for rows in [int(v) for v in a.rows.split(",")]:
        probe_gemm("gate_up", 4096, 7168, a.experts, rows, a.reps, dev, out)
        probe_gemm("down", 7168, 2048, a.experts, rows, a.reps, dev, out)
    record.write_json(record.result_path(a.json, "probe_fp8_block.json"),
                      dict(env=record.env_info(dev, modules=("triton",)), args=vars(a),
                           method=__doc__.splitlines()[0], results=out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
