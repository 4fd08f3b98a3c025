"""The quantized GEMM kernels compiled for Hopper (sm90) on a CPU machine: registers, stack, main-loop SASS.

For each tile configuration, the block-FP8 or MXFP4 kernel of ``dwdp_comm.kernels.triton_quant_kernels``
is compiled with Triton's bundled ``ptxas`` (no GPU, no driver) under the specialisations a real launch
gets (16-divisible pointers and strides, unit strides as constants), then disassembled with ``nvdisasm``.
Printed per configuration: registers and stack per thread (``cuobjdump -res-usage``), the instructions
of the innermost loop holding the MMA (the K loop; None where none is found, as in some small tiles'
pipelined forms) with their most common opcodes, and an MD5 of the
whole SASS without addresses (two trees compiling to the same code print the same hash). A count, not a
timing: fewer loop instructions mean less issue work per K step, which matters where a kernel is
issue-bound (the MXFP4 decode); the GPU decides. Run it against an older tree with ``PYTHONPATH`` to
compare (constexprs the older kernel lacks are left out).

Usage::

    env -u TRITON_INTERPRET PYTHONPATH=. python3 -m perf.kernel_sass [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import re
import subprocess
import sys
import tempfile

MX_PTRS = {"a_ptr": "*bf16", "w_ptr": "*u8", "wtab_ptr": "*i64", "ws_ptr": "*u8", "offs_ptr": "*i32",
           "tend_ptr": "*i32", "out_ptr": "*bf16"}
FP8_PTRS = {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "w_ptr": "*fp8e4nv", "wtab_ptr": "*i64", "ws_ptr": "*fp32",
            "offs_ptr": "*i32", "tend_ptr": "*i32", "out_ptr": "*bf16"}
#: ``(kernel, (BM, BN, BK, warps, stages), constexprs)``: the rule's tiles and the ones the notes cite.
CASES = [("mxfp4", (128, 128, 64, 8, 3), dict(SWAP=False, ASM=True)),
         ("mxfp4", (16, 64, 128, 4, 4), dict(SWAP=True, ASM=True)),
         ("mxfp4", (16, 128, 128, 4, 3), dict(SWAP=False, ASM=True)),
         ("mxfp4", (64, 128, 64, 4, 3), dict(SWAP=False, ASM=True)),
         ("mxfp4", (128, 128, 64, 8, 3), dict(SWAP=True, ASM=True)),
         ("fp8_block", (64, 128, 128, 4, 3), dict(ONE_BS=True)),
         ("fp8_block", (128, 128, 128, 8, 4), dict(ONE_BS=True)),
         ("fp8_block", (64, 128, 128, 4, 3), dict(ONE_BS=False))]


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ops(sass: str) -> list[tuple[str, str]]:
    """``(opcode or label, line)`` in order; labels as ``(".Lname", "")``."""
    out = []
    for line in sass.splitlines():
        lab = re.match(r"^\s*(\.L\w+):", line)
        if lab:
            out.append((lab.group(1), ""))
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            out.append((m.group(1), line))
    return out


def k_loop(sass: str) -> list[str]:
    """Opcodes of the smallest backward-branch loop that holds an MMA (HGMMA / QGMMA)."""
    ops = _ops(sass)
    labels, instrs = {}, []
    for op, line in ops:
        if op.startswith(".L"):
            labels[op] = len(instrs)
        else:
            instrs.append((op, line))
    best = None
    for i, (op, line) in enumerate(instrs):
        target = re.search(r"(\.L\w+)", line) if op == "BRA" else None
        if target and labels.get(target.group(1), i + 1) <= i:
            body = [o for o, _ in instrs[labels[target.group(1)]:i + 1]]
            if any("GMMA" in o for o in body) and (best is None or len(body) < len(best)):
                best = body
    return best or []


def compile_case(kind: str, tile: tuple, extra: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dwdp_comm.kernels import triton_quant_kernels as q
    bm, bn, bk, warps, stages = tile
    fn, ptrs = (q.mxfp4_kernel, MX_PTRS) if kind == "mxfp4" else (q.fp8_block_kernel, FP8_PTRS)
    consts = dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, LOG_E=8, USE_TABLE=kind == "mxfp4", stride_wk=1, **extra)
    if kind == "mxfp4":
        consts["ws_sk"] = 1
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    div16 = [n for n in ("a_stride", "M", "N", "K", "stride_we", "stride_wn", "ws_se", "ws_sn", "out_stride")
             if n in fn.arg_names]
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in list(ptrs) + div16 if n not in consts}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    reg, stack = re.search(r"REG:(\d+)", res), re.search(r"STACK:(\d+)", res)
    loop = k_loop(sass)
    flat = "\n".join(re.sub(r"/\*[0-9a-f]+\*/", "", line) for line in sass.splitlines() if "/*" in line)
    return dict(kernel=kind, tile="x".join(map(str, tile[:3])) + f"w{warps}s{stages}", constexprs=extra,
                regs=int(reg.group(1)) if reg else None, stack=int(stack.group(1)) if stack else None,
                loop_instructions=len(loop) or None, loop_top=dict(collections.Counter(loop).most_common(8)),
                sass_md5=hashlib.md5(flat.encode()).hexdigest())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the kernels must compile")
        return 2
    from dwdp_comm.bench import record
    rows = []
    for kind, tile, extra in CASES:
        try:
            row = compile_case(kind, tile, extra)
        except Exception as exc:  # an older tree may lack a constexpr's path: report, go on
            row = dict(kernel=kind, tile=tile, constexprs=extra, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        rows.append(row)
        print(f"{row['kernel']:9s} {row['tile']!s:16s} {extra!s:34s} " + (
            f"regs {row['regs']} stack {row['stack']} loop {row['loop_instructions']} md5 {row['sass_md5'][:8]} "
            f"{row['loop_top']}" if "error" not in row else row["error"]), flush=True)
    record.write_json(args.json, dict(env=dict(date=record.utc_date(), host=record.host(),
                                               commit=record.commit(short=True), target="sm90 (offline)"),
                                      rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
