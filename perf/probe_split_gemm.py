"""Where does the split-weight grouped GEMM lose time against one contiguous call? (exploration)

Times, in the sustained-block method of ``bench_grouped_gemm.py`` (same Timer), the parts of the
split path and candidate replacements, on DeepSeek-V3 shapes with 4 owner pieces (VMM pieces
of the cuda_ipc backend):

  raw / raw_again     torch._grouped_mm on the contiguous [E, K, N] tensor (baseline, noise floor)
  split               dwdp_comm.kernels.grouped_gemm on the pieces (auto: segments_async, the pieces
                      on worker streams; the result files of bbdbce0 and 0aa3902 also have "streams",
                      the prototype of that method written here before it moved into the library)
  pieces_gemm_only    the 4 per-piece grouped GEMMs of ``split`` with no result assembly
  pieces_on_slices    the 4 per-piece grouped GEMMs, each on its own rows of x (piece 0 too)
  piece0_whole_x      piece 0's GEMM on the whole of x (the in-place trick) alone
  piece0_slice        piece 0's GEMM on its rows only
  copies_only         the 3 result copies of ``split`` alone (copy engine)
  cublas_grouped      candidate: cublasGemmGroupedBatchedEx (ctypes) with per-expert weight and
                      output pointers: split weights natively, results written in place
  composite           grouped_gemm on the VMM composite view (dwdp_comm.bench.split_weights)
  direct_<R>          grouped_gemm, method segments_direct with direct_min_rows=R: piece 0 in place,
                      in the other pieces experts with >= R rows as torch.mm into the output rows
                      (no temporary, no copy), runs of smaller ones grouped (temporary + copy)
  per_expert          grouped_gemm, method per_expert: torch.mm per expert into the output, in
                      order on the current stream

Usage: CUDA_VISIBLE_DEVICES=0 python3 -m perf.probe_split_gemm --json FILE
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import math
import os
import sys
import time
import traceback

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import numpy as np  # noqa: E402
import torch  # noqa: E402

import dwdp_comm.kernels as K  # noqa: E402
from dwdp_comm.bench import record  # noqa: E402
from dwdp_comm.bench.split_weights import SplitWeights, single_rank_group  # noqa: E402
from dwdp_comm.bench.timing import Timer, rel_err, summarize_times  # noqa: E402
from dwdp_comm.bench.workload import DEEPSEEK_V3_SHAPES, routed_counts  # noqa: E402


def log(*a) -> None:
    print(*a, flush=True)


# ---- cuBLAS grouped GEMM through ctypes -----------------------------------------------------------
class Cublas:
    """cublasGemmGroupedBatchedEx on torch's cuBLAS handle (column-major mapping of row-major data)."""

    CUDA_R_16BF, CUBLAS_COMPUTE_32F, OP_N = 14, 68, 0

    def __init__(self):
        lib = None
        names = ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]
        for n in names:
            try:
                lib = ctypes.CDLL(n)
                break
            except OSError:
                pass
        if lib is None:
            roots = [os.path.dirname(torch.__file__)] + [p for p in sys.path if "site-packages" in p]
            for r in roots:
                for f in glob.glob(os.path.join(r, "..", "nvidia", "**", "libcublas.so*"), recursive=True) + \
                        glob.glob(os.path.join(r, "nvidia", "**", "libcublas.so*"), recursive=True):
                    try:
                        lib = ctypes.CDLL(f)
                        break
                    except OSError:
                        pass
                if lib is not None:
                    break
        if lib is None:
            raise RuntimeError("libcublas not found")
        self.lib = lib
        self.fn = lib.cublasGemmGroupedBatchedEx
        self.fn.restype = ctypes.c_int
        ver = ctypes.c_int()
        self.handle = ctypes.c_void_p(torch.cuda.current_blas_handle())
        lib.cublasGetVersion_v2(self.handle, ctypes.byref(ver))
        self.version = ver.value

    def run(self, x, sizes, starts, pieces, N, Kd, out):
        """out[rows of e] = x[rows of e] @ w[e] for every expert with rows; w from the pieces."""
        wp, xp, cp, ms = [], [], [], []
        esz = x.element_size()
        for first, w in pieces:
            for i in range(w.shape[0]):
                e = first + i
                m = int(sizes[e])
                if m == 0:
                    continue
                r0 = int(starts[e])
                ms.append(m)
                wp.append(w.data_ptr() + i * w.stride(0) * esz)
                xp.append(x.data_ptr() + r0 * Kd * esz)
                cp.append(out.data_ptr() + r0 * N * esz)
        G = len(ms)
        ptrs = torch.tensor(np.array(wp + xp + cp, dtype=np.int64)).pin_memory().to(x.device, non_blocking=True)
        A, Bp, C = ptrs[:G], ptrs[G:2 * G], ptrs[2 * G:]
        ia = lambda v: (ctypes.c_int * G)(*v)  # noqa: E731
        ones = (ctypes.c_float * G)(*([1.0] * G))
        zeros = (ctypes.c_float * G)(*([0.0] * G))
        self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        st = self.fn(self.handle, ia([self.OP_N] * G), ia([self.OP_N] * G),
                     ia([N] * G), ia(ms), ia([Kd] * G), ones,
                     ctypes.c_void_p(A.data_ptr()), self.CUDA_R_16BF, ia([N] * G),
                     ctypes.c_void_p(Bp.data_ptr()), self.CUDA_R_16BF, ia([Kd] * G),
                     zeros,
                     ctypes.c_void_p(C.data_ptr()), self.CUDA_R_16BF, ia([N] * G),
                     ctypes.c_int(G), ia([1] * G), self.CUBLAS_COMPUTE_32F)
        if st != 0:
            raise RuntimeError(f"cublasGemmGroupedBatchedEx status {st}")
        self._keep = ptrs
        return out


def _direct(x, groups, split, min_rows):
    """segments_direct at ``min_rows`` ("split", auto, keeps the default)."""
    return K.grouped_gemm(x, groups, split, backend="torch:segments_direct", direct_min_rows=min_rows)


def probe(name, Kd, N, tokens_list, args, timer, seed, rows_out, checks, group):
    dev = torch.device("cuda")
    E = args.experts
    g = torch.Generator(device=dev).manual_seed(seed)
    w = torch.randn(E, Kd, N, generator=g, device=dev, dtype=torch.bfloat16).div_(math.sqrt(Kd))
    q = E // 4
    cuts = [0, q, 2 * q, 3 * q, E]
    vm = SplitWeights(group, w, cuts)  # pieces in VMM allocations of the cuda_ipc backend, and their composite
    split, composite = vm.segments, vm.composite
    if composite is None:
        log(f"# no composite view: {vm.why_not}")
    cub = None
    if args.cublas:
        try:
            cub = Cublas()
            log(f"# cuBLAS version {cub.version}")
        except Exception as exc:
            log(f"# cuBLAS grouped unavailable: {exc}")
    for tokens in tokens_list:
        sizes, stats = routed_counts(tokens, E, 8, seed + tokens)
        T = stats["rows"]
        groups = K.TokenGroups(sizes)
        offs = groups.device_offsets(dev)
        bounds = tuple((a, b - a) for a, b in zip(cuts[:-1], cuts[1:]))
        poffs = groups.piece_offsets(dev, bounds)
        rows = [groups.rows(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
        x = torch.randn(T, Kd, generator=g, device=dev, dtype=torch.bfloat16)
        temps = [torch.empty(r1 - r0, N, dtype=torch.bfloat16, device=dev) for r0, r1 in rows]
        outbuf = torch.empty(T, N, dtype=torch.bfloat16, device=dev)
        starts = groups.starts
        sz = groups.sizes
        v = {
            "raw": lambda: torch._grouped_mm(x, w, offs=offs),
            "raw_again": lambda: torch._grouped_mm(x, w, offs=offs),
            "split": lambda: K.grouped_gemm(x, groups, split, backend="torch"),
            "pieces_gemm_only": lambda: ([torch._grouped_mm(x[r0:r1], split[j][1], offs=poffs[j])
                                          for j, (r0, r1) in enumerate(rows) if j > 0],
                                         torch._grouped_mm(x, split[0][1], offs=poffs[0])),
            "pieces_on_slices": lambda: [torch._grouped_mm(x[r0:r1], split[j][1], offs=poffs[j])
                                         for j, (r0, r1) in enumerate(rows)],
            "piece0_whole_x": lambda: torch._grouped_mm(x, split[0][1], offs=poffs[0]),
            "piece0_slice": lambda: torch._grouped_mm(x[:rows[0][1]], split[0][1], offs=poffs[0]),
            "copies_only": lambda: [outbuf[r0:r1].copy_(temps[j]) for j, (r0, r1) in enumerate(rows) if j > 0],
        }
        if composite is not None:
            v["composite"] = lambda: K.grouped_gemm(x, groups, composite, backend="torch")
        for r in (int(t) for t in args.direct_rows.split(",") if t):
            v[f"direct_{r}"] = (lambda r: lambda: _direct(x, groups, split, r))(r)
        v["per_expert"] = lambda: K.grouped_gemm(x, groups, split, backend="torch:per_expert")
        if cub is not None:
            v["cublas_grouped"] = lambda: cub.run(x, sz, starts, split, N, Kd, torch.empty(T, N, dtype=torch.bfloat16,
                                                                                         device=dev))
        if args.variants:
            keep = set(args.variants.split(",")) | {"raw"}
            v = {k: f for k, f in v.items() if k in keep}
        base = v["raw"]()
        for k in ["split", "composite", "cublas_grouped", "per_expert"] + [k for k in v if k.startswith("direct_")]:
            if k not in v:
                continue
            try:
                e = rel_err(v[k](), base)
                checks.append(dict(shape=name, tokens=tokens, variant=k, rel_err=e, ok=bool(e < 1e-2)))
                log(f"  check {k}: {e:.2e}")
                if not e < 1e-2:
                    v.pop(k)
            except Exception as exc:
                log(f"  {k} FAILED: {type(exc).__name__}: {exc}")
                checks.append(dict(shape=name, tokens=tokens, variant=k, rel_err=None, ok=False, error=str(exc)[:300]))
                v.pop(k)
        base = None
        host = {}  # host time to enqueue one call, GPU idle before it (nothing to wait for)
        for k, f in v.items():
            ts = []
            for _ in range(7):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            host[k] = float(np.median(ts)) * 1e6
        torch.cuda.synchronize()
        times = timer.rounds(v, args.rounds, 1)
        flops = 2.0 * T * Kd * N
        common = dict(shape=name, K=Kd, N=N, tokens=tokens, rows=T, row_split=[r1 - r0 for r0, r1 in rows])
        res = summarize_times(times, "raw", flops, common, "probe", timer.calls)
        for r in res:
            r["host_us"] = host[r["variant"]]
        rows_out.extend(res)
        log(f"# {name} tokens={tokens} rows={T} pieces' rows {common['row_split']}")
        for r in res:
            log(f"    {r['variant']:>18}: {r['ms']:9.3f} ms  {r['tflops']:7.1f} TFLOP/s  x{r['ratio']:.3f} "
                  f"[{r['ratio_p10']:.3f}, {r['ratio_p90']:.3f}] ({r['calls_per_block']} calls/block, host "
                  f"{r['host_us']:.0f} us/call)")
        x = temps = outbuf = None
        torch.cuda.empty_cache()
    split = composite = None
    vm.close()
    w = None
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8192,65536")
    ap.add_argument("--shapes", default="down,gate_up")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--block-ms", type=float, default=150.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cublas", action="store_true", help="also time cublasGemmGroupedBatchedEx (ctypes)")
    ap.add_argument("--variants", default="", help="comma-separated subset (raw is always kept)")
    ap.add_argument("--direct-rows", default="0,256,1024", help="direct_min_rows values for direct_<R> variants")
    args = ap.parse_args()
    dev = torch.device("cuda")
    seed = int.from_bytes(os.urandom(4), "little") % 2**31
    info = record.env_info(dev)
    log(f"# probe_split_gemm {info['date']} gpu={info.get('gpu')} torch={info['torch']} commit={info['git']['commit']}")
    timer = Timer(dev, block_ms=args.block_ms)
    rows, checks = [], []
    t0 = time.perf_counter()
    with single_rank_group("cuda_ipc") as group:  # its backend makes the pieces and the composite
        for name in args.shapes.split(","):
            Kd, N = DEEPSEEK_V3_SHAPES[name]
            try:
                probe(name, Kd, N, [int(t) for t in args.tokens.split(",")], args, timer, seed, rows, checks, group)
            except Exception as exc:
                log(f"# {name} FAILED {type(exc).__name__}: {exc}")
                traceback.print_exc()
    log(f"# elapsed {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=info, args=vars(args), seed=seed, results=rows, checks=checks), f, indent=1, default=str)


if __name__ == "__main__":
    main()
