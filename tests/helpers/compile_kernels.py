"""Compile the library's Triton kernels for Hopper (sm90) without a GPU; print one JSON line per kernel.

Run in a fresh process (``python3 -m tests.helpers.compile_kernels``) with ``TRITON_INTERPRET``
unset: Triton fixes a kernel's mode (compiled or interpreted) when its module is imported, and the
CPU tests import the kernels in the interpreter. Triton's own ``ptxas`` builds the cubin; no CUDA
driver is needed. Each line: ``{"kernel", "config", "ok", "error", "mma_a"}`` where ``mma_a`` says
where a Hopper ``warp_group_dot`` reads its first operand (``"registers"``, ``"shared"``, or None
without one), from the kernel's TTGIR.
"""

from __future__ import annotations

import json
import os
import re
import sys


def _sig(fn, pointers: dict, consts: dict) -> dict:
    return {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in fn.arg_names}


def _mma_a(ttgir: str) -> str | None:
    dots = re.findall(r"ttng\.warp_group_dot [^\n]*", ttgir)
    if not dots:
        return None
    return "shared" if all(" : !ttg.memdesc" in d for d in dots) else "registers"


def cases():
    """``(name, fn, pointer types, constexprs, num_warps, num_stages)`` of every kernel checked."""
    from dwdp_comm.kernels import triton_moe
    from dwdp_comm.kernels import triton_quant_kernels as q
    from dwdp_comm.kernels import triton_route_kernels as r
    route_ptrs = {"ids_ptr": "*i64", "w_ptr": "*bf16", "x_ptr": "*bf16", "rows_ptr": "*bf16", "offs_ptr": "*i32",
                  "src_ptr": "*i64", "rw_ptr": "*bf16", "counts_ptr": "*i32", "incl_ptr": "*i32"}
    out = []
    for e_pad in (32, 256):
        out.append(("route", r.route_kernel, route_ptrs, dict(CHUNK=32, E_PAD=e_pad, BLOCK_H=128), 4, 3))
        out.append(("count", r.count_kernel, route_ptrs, dict(CHUNK=32, E_PAD=e_pad, PER_BLOCK=8), 4, 3))
        out.append(("place", r.place_kernel, route_ptrs, dict(CHUNK=32, E_PAD=e_pad, BLOCK_H=128, PER_BLOCK=8), 4, 3))
    mx = {"a_ptr": "*bf16", "w_ptr": "*u8", "wtab_ptr": "*i64", "ws_ptr": "*u8", "offs_ptr": "*i32",
          "tend_ptr": "*i32", "out_ptr": "*bf16"}
    for swap, asm, (bm, bn, bk, w, s) in [(False, True, (128, 128, 64, 8, 3)), (True, True, (128, 128, 64, 8, 3)),
                                          (True, True, (16, 64, 128, 4, 4)), (False, False, (64, 128, 64, 4, 3)),
                                          (True, False, (16, 64, 128, 4, 4))]:
        out.append((f"mxfp4{'-swap' if swap else ''}{'' if asm else '-tdec'}", q.mxfp4_kernel, mx,
                    dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, LOG_E=8, USE_TABLE=True, SWAP=swap, ASM=asm), w, s))
    fp8 = {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "w_ptr": "*fp8e4nv", "wtab_ptr": "*i64", "ws_ptr": "*fp32",
           "offs_ptr": "*i32", "tend_ptr": "*i32", "out_ptr": "*bf16"}
    for one_bs in (True, False):
        out.append(("fp8_block", q.fp8_block_kernel, fp8, dict(BM=64, BN=128, BK=128, GROUP_M=8, LOG_E=8, USE_TABLE=False,
                                                               ONE_BS=one_bs), 4, 3))
    out.append(("quant", q.quant_kernel, {"x_ptr": "*bf16", "rows_ptr": "*i64", "xq_ptr": "*fp8e4nv",
                                          "xs_ptr": "*fp32", "limit_ptr": "*i32"},
                dict(HAS_ROWS=True, HAS_LIMIT=True, GROUP=128, NG=8), 4, 3))
    out.append(("tile_ends", q.tile_ends_kernel, {"offs_ptr": "*i32", "out_ptr": "*i32"}, dict(BM=64, BLOCK_E=256),
                4, 3))
    out.append(("dequant_mxfp4", q.dequant_mxfp4_kernel, {"w_ptr": "*u8", "s_ptr": "*u8", "out_ptr": "*bf16"},
                dict(BR=8, BC=256), 4, 3))
    out.append(("dequant_fp8", q.dequant_fp8_kernel, {"w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "out_ptr": "*bf16"},
                dict(BR=8, BC=512), 4, 3))
    got = triton_moe._triton()
    if not isinstance(got, str):
        _, gated, combine = got
        out.append(("gated_activation", gated, {"h_ptr": "*bf16", "out_ptr": "*bf16", "limit_ptr": "*i32",
                                                "w_ptr": "*bf16", "b_ptr": "*bf16", "e_ptr": "*i64"},
                    dict(INTERLEAVED=False, HAS_LIMIT=True, HAS_W=True, HAS_BIAS=False, BLOCK_N=1024), 4, 3))
        out.append(("combine", combine, {"base_ptr": "*bf16", "src_ptr": "*i64", "w_ptr": "*bf16", "out_ptr": "*bf16"},
                    dict(K=8, HAS_W=True, BLOCK_N=1024), 4, 3))
    return out


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(json.dumps({"error": "TRITON_INTERPRET=1 is set: unset it (the kernels must compile)"}))
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", 90, 32)
    bad = 0
    for name, fn, ptrs, consts, warps, stages in cases():
        row = {"kernel": name, "config": {k: v for k, v in consts.items()}, "ok": False, "error": None, "mma_a": None}
        try:
            k = triton.compile(ASTSource(fn=fn, signature=_sig(fn, ptrs, consts), constexprs=consts), target=target,
                               options={"num_warps": warps, "num_stages": stages})
            row.update(ok=True, mma_a=_mma_a(k.asm["ttgir"]))
        except Exception as exc:  # report every kernel, then fail
            row["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            bad += 1
        print(json.dumps(row), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
