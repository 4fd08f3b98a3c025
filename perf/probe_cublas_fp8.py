"""Which operand layouts torch's block-scaled FP8 GEMM accepts on this machine (cuBLAS 1x128 / 128x128).

torch's ``_scaled_mm`` infers the scaling recipe from the scales' shapes and strides, and its rules
changed between releases (torch 2.11 refused the layout torch 2.13's meta kernel accepts, with
"Invalid scaling configuration"). This probe tries each candidate layout of ``scale_a`` ``[M, K/128]``
and ``scale_b`` (``[K/128, N/128]`` or transposed, row- or column-major, padded leading dimension), and
the newer ``torch.nn.functional.scaled_mm`` with explicit ``ScalingType`` recipes where torch has it,
on random data against a float64 reference. One JSON line per candidate.

Usage: python3 -m perf.probe_cublas_fp8 [--m 256 --n 512 --k 640]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _quant_blocks(w: torch.Tensor, bn: int, bk: int):
    n, k = w.shape
    blocks = w.view(n // bn, bn, k // bk, bk)
    s = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / s[:, None, :, None]).to(torch.float8_e4m3fn).view(n, k)
    return q, s.float()  # s: [N/bn, K/bk]


def _quant_rows(x: torch.Tensor, bk: int):
    m, k = x.shape
    g = x.view(m, k // bk, bk)
    s = g.abs().amax(dim=2).clamp(min=1e-12) / 448.0
    return (g / s[:, :, None]).to(torch.float8_e4m3fn).view(m, k), s.float()  # s: [M, K/bk]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--k", type=int, default=640)  # K/128 = 5: not a multiple of 4
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs a CUDA GPU"}))
        return 2
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    m, n, k = args.m, args.n, args.k
    x = torch.randn(m, k, device=dev, generator=g)
    w = torch.randn(n, k, device=dev, generator=g) / k ** 0.5
    xq, xs = _quant_rows(x, 128)
    wq, ws = _quant_blocks(w, 128, 128)
    ref = (xq.double() * xs.double().repeat_interleave(128, 1)) @ \
        (wq.double() * ws.double().repeat_interleave(128, 0).repeat_interleave(128, 1)).t()
    kb, nb = k // 128, n // 128
    l4 = -(-kb // 4) * 4
    sa_cands = {"a_colmajor": xs.t().contiguous().t(), "a_rowmajor": xs.contiguous()}
    sb_l4 = torch.zeros(nb, l4, device=dev)
    sb_l4[:, :kb] = ws
    sb_cands = {"b[K/128,N/128]_colmajor_ld_kb": ws.contiguous().t(),  # stride (1, kb)
                "b[K/128,N/128]_colmajor_ld_l4": sb_l4[:, :kb].t(),     # stride (1, l4)
                "b[K/128,N/128]_rowmajor": ws.t().contiguous(),
                "b[N/128,K/128]_rowmajor": ws.contiguous(),
                "b[N/128,K/128]_colmajor": ws.t().contiguous().t()}
    b = wq.t()  # [K, N] column-major, as _scaled_mm wants its second operand
    rows = []
    for an, sa in sa_cands.items():
        for bn_, sb in sb_cands.items():
            row = {"api": "_scaled_mm", "scale_a": an, "scale_a_shape": list(sa.shape), "scale_a_stride": list(sa.stride()),
                   "scale_b": bn_, "scale_b_shape": list(sb.shape), "scale_b_stride": list(sb.stride())}
            try:
                out = torch._scaled_mm(xq, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
                torch.cuda.synchronize()
                err = float((out.double() - ref).norm() / ref.norm())
                row.update(ok=err < 2e-2, rel_err=err)
            except Exception as exc:  # noqa: BLE001 - the point is which layouts are refused
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    f = getattr(torch.nn.functional, "scaled_mm", None)
    st = getattr(torch.nn.functional, "ScalingType", None)
    if f is not None and st is not None:
        for an, sa in sa_cands.items():
            for bn_, sb in sb_cands.items():
                row = {"api": "F.scaled_mm", "scale_a": an, "scale_b": bn_}
                try:
                    out = f(xq, b, sa, st.BlockWise1x128, sb, st.BlockWise128x128, output_dtype=torch.bfloat16)
                    torch.cuda.synchronize()
                    err = float((out.double() - ref).norm() / ref.norm())
                    row.update(ok=err < 2e-2, rel_err=err)
                except Exception as exc:  # noqa: BLE001
                    row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                      "cublas_lt": getattr(torch.backends.cuda, "preferred_blas_library", lambda: None)().__str__(),
                      "working": [r for r in rows if r.get("ok")]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
