"""Numba CUDA grouped GEMM that reads split weights natively, through per-expert pointers.

Design
------
- One block computes a ``BM x BN`` tile of one expert's output rows. A host-built tile map
  (``tile_e``, ``tile_r0``, ``tile_r1``: expert, first row, end row) lets one launch cover every
  expert's tiles; ``blockIdx.x`` walks N so that blocks running together share the same rows of
  ``x`` and stream one expert's weights once. Experts without tokens get no tile.
- Weights are never merged or copied: the kernel gets, per expert, the address of its ``[K, N]``
  block and its two strides (int64 device arrays), so any mix of pieces (local shard, prefetch
  slot, composite view, transposed layout) is read in place.
- Tiles of ``x`` (``BM x BK``) and of the weights (``BK x BN``) are staged through shared memory;
  each thread accumulates a ``TM x TN`` register tile in float32, reading its fragments as runs of
  4 floats (128-bit shared loads, conflict-free). The next K step's tiles are loaded into
  registers while the current one is multiplied (one barrier pair per step).
- bf16: Numba has no bf16 type, so bf16 operands are loaded as 16-bit integers and widened into
  the high half of a float32 (exact: bf16 is the top 16 bits of a float32). Accumulation is
  float32; a bf16 result is rounded once at the end by torch (``float32 -> bf16``,
  round-to-nearest-even).

Pointer loads, GPU and simulator
--------------------------------
On the GPU, ``_ld_f32(addr, index)`` / ``_ld_bf16(addr, index)`` are Numba intrinsics that turn the
int64 address into a global-memory pointer (LLVM ``inttoptr``) and load element ``index``. The
CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) runs kernels as Python, where intrinsics do not run,
so the same two names are bound to Python functions reading from a registry of host arrays keyed
by the same addresses (the simulator's "device" memory is host memory). The kernel source is the
same for both; :func:`_loads` picks the pair once.

Streams: on the GPU the kernel runs on torch's current stream of ``x``'s device; the host does not
wait. In the simulator it runs synchronously.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BackendUnavailableError, bad_arg
from ..checks import check_int
from .problem import Problem

__all__ = ["run", "TileConfig", "CONFIGS", "DEFAULT_CONFIG", "unavailable_reason", "numba_cuda", "build_kernel",
           "MAX_GRID_Y"]

cuda = None  # numba.cuda (or its simulator), bound by numba_cuda(); the simulator swaps this global
_lock = threading.Lock()
_kernels: dict = {}
_SIM_MEM: dict[int, np.ndarray] = {}  # simulator only: address -> flat host view
MAX_GRID_Y = 65535  # tiles per launch (gridDim.y limit); more tiles take several launches


@dataclass(frozen=True)
class TileConfig:
    """Block tile ``bm x bn``, K step ``bk``, per-thread tile ``tm x tn``.

    The block has ``(bn // tn) * (bm // tm)`` threads; both tile loads must divide evenly
    among them.
    """

    bm: int
    bn: int
    bk: int
    tm: int
    tn: int

    @property
    def threads(self) -> tuple[int, int]:
        return self.bn // self.tn, self.bm // self.tm

    def check(self) -> None:
        tx, ty = self.threads
        nt = tx * ty
        ok = (self.bm % self.tm == 0 and self.bn % self.tn == 0 and 0 < nt <= 1024
              and (self.bm * self.bk) % nt == 0 and (self.bk * self.bn) % nt == 0
              and self.tm % min(4, self.tm) == 0 and self.tn % min(4, self.tn) == 0)
        if not ok:
            raise bad_arg("config", self, "tm | bm, tn | bn, <= 1024 threads, bm*bk and bk*bn divisible by the "
                          "thread count, and tm, tn below 4 or multiples of 4")

    @property
    def name(self) -> str:
        return f"{self.bm}x{self.bn}x{self.bk}/{self.tm}x{self.tn}"


CONFIGS = {
    "128x128x8": TileConfig(128, 128, 8, 8, 8),  # 256 threads, 64 outputs each: the classic SGEMM shape
    "64x128x8": TileConfig(64, 128, 8, 8, 8),    # 128 threads: less waste on experts with few tokens
    "64x64x16": TileConfig(64, 64, 16, 4, 4),    # 256 threads, 16 outputs each
    "16x16x4": TileConfig(16, 16, 4, 2, 2),      # small: many tiles on small shapes (tests)
    "8x8x4": TileConfig(8, 8, 4, 2, 2),          # tiny: 16 threads, quick in the simulator
}
DEFAULT_CONFIG = "128x128x8"


def unavailable_reason() -> str | None:
    """None when the Numba backend can run here (a GPU, or the simulator), else why not."""
    from ._numba_compat import unavailable_reason as why
    return why()


def numba_cuda():
    """``numba.cuda`` (the simulator with ``NUMBA_ENABLE_CUDASIM=1``), imported on first call."""
    global cuda
    if cuda is None:
        from ._numba_compat import import_numba_cuda
        cuda = import_numba_cuda()
    return cuda


def _is_sim() -> bool:
    from ._numba_compat import is_simulator
    return is_simulator(numba_cuda())


# ---- loads ---------------------------------------------------------------------------------------
def _gpu_loads():
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    def make(bf16: bool):
        @intrinsic
        def ld(typingctx, addr, index):
            if not isinstance(addr, types.Integer) or not isinstance(index, types.Integer):
                return None

            def codegen(context, builder, sig, args):
                a = context.cast(builder, args[0], sig.args[0], types.int64)
                i = context.cast(builder, args[1], sig.args[1], types.int64)
                ety = ir.IntType(16) if bf16 else ir.FloatType()
                ptr = builder.inttoptr(a, ir.PointerType(ety, addrspace=1))  # global memory
                v = builder.load(builder.gep(ptr, [i]))
                if bf16:
                    v32 = builder.shl(builder.zext(v, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
                    v = builder.bitcast(v32, ir.FloatType())
                return v

            return types.float32(addr, index), codegen

        return ld

    return make(False), make(True)


def _sim_ld_f32(addr, index):
    return np.float32(_SIM_MEM[int(addr)][int(index)])


def _sim_ld_bf16(addr, index):
    bits = np.uint32(_SIM_MEM[int(addr)][int(index)]) << np.uint32(16)
    return bits.view(np.float32)


def _loads():
    return (_sim_ld_f32, _sim_ld_bf16) if _is_sim() else _gpu_loads()


# ---- kernel --------------------------------------------------------------------------------------
def _kernel(cfg: TileConfig, x_bf16: bool, w_bf16: bool):
    key = (cfg, x_bf16, w_bf16, _is_sim())
    with _lock:
        k = _kernels.get(key)
        if k is None:
            k = _kernels[key] = build_kernel(cfg, x_bf16, w_bf16)
        return k


def build_kernel(cfg: TileConfig, x_bf16: bool, w_bf16: bool):
    """A fresh (uncached) kernel for tile shape ``cfg`` and bf16 / float32 ``x`` and weights.

    Imports numba. :func:`run` uses a per-process cache of these; the kernel's ``py_func`` can
    be compiled on its own (``numba_cuda().compile_ptx``) to inspect the code without a GPU.
    """
    cfg.check()
    numba_cuda()
    ld_f32, ld_bf16 = _loads()
    ldx = ld_bf16 if x_bf16 else ld_f32
    ldw = ld_bf16 if w_bf16 else ld_f32
    BM, BN, BK, TM, TN = cfg.bm, cfg.bn, cfg.bk, cfg.tm, cfg.tn
    TX, TY = cfg.threads
    NT = TX * TY
    A_PER = BM * BK // NT
    B_PER = BK * BN // NT
    f32 = np.float32
    u64 = np.uint64
    # Shared-memory indices in the inner loop are built from unsigned values only: Numba then emits
    # no negative-index wraparound code there.
    # Thread (tx, ty) owns rows (i // VM) * TY * VM + ty * VM + i % VM and columns likewise: runs of
    # VM / VN consecutive elements, so fragment reads become 128-bit shared loads without bank
    # conflicts (the runs of neighbouring threads are adjacent).
    VM, VN = min(4, TM), min(4, TN)
    # a_s rows are padded by 4 floats: the transposing store (8 k values of one row of x per
    # 8 threads) then hits distinct banks, and rows stay 16-byte aligned for the 128-bit reads.
    LDA = BM + 4
    BNu, VMu, VNu, LDAu = u64(BN), u64(VM), u64(VN), u64(LDA)
    A_SIZE, B_SIZE = BK * LDA, BK * BN

    def grouped_gemm_kernel(x_addr, sxr, sxk, w_addr, w_sk, w_sn, tile_e, tile_r0, tile_r1, tile_base,
                            out, K, N):
        a_s = cuda.shared.array(A_SIZE, f32)  # a_s[kk * LDA + m]: x tile, transposed
        b_s = cuda.shared.array(B_SIZE, f32)  # b_s[kk * BN + n]: weight tile
        acc = cuda.local.array((TM, TN), f32)
        a_f = cuda.local.array(TM, f32)
        b_f = cuda.local.array(TN, f32)
        a_r = cuda.local.array(A_PER, f32)  # next x tile, in flight while the current one is used
        b_r = cuda.local.array(B_PER, f32)  # next weight tile
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        txu = u64(tx)
        tyu = u64(ty)
        tid = ty * TX + tx
        n0 = cuda.blockIdx.x * BN
        t = cuda.blockIdx.y + tile_base
        e = tile_e[t]
        r0 = tile_r0[t]
        r1 = tile_r1[t]
        wa = w_addr[e]
        wsk = w_sk[e]
        wsn = w_sn[e]
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = f32(0.0)
        # k0 = -BK only loads the first tile; each later step stores the loaded tile to shared
        # memory, starts loading the next one, then computes on the stored one.
        for k0 in range(-BK, K, BK):
            if k0 >= 0:
                for q in range(A_PER):
                    idx = tid + q * NT
                    a_s[(idx % BK) * LDA + idx // BK] = a_r[q]
                for q in range(B_PER):
                    b_s[tid + q * NT] = b_r[q]  # idx // BN * BN + idx % BN == idx
                cuda.syncthreads()
            kn = k0 + BK
            for q in range(A_PER):
                idx = tid + q * NT
                r = r0 + idx // BK
                k = kn + idx % BK
                v = f32(0.0)
                if r < r1 and k < K:
                    v = ldx(x_addr, r * sxr + k * sxk)
                a_r[q] = v
            for q in range(B_PER):
                idx = tid + q * NT
                n = n0 + idx % BN
                k = kn + idx // BN
                v = f32(0.0)
                if n < N and k < K:
                    v = ldw(wa, k * wsk + n * wsn)
                b_r[q] = v
            if k0 >= 0:
                for kk in range(BK):
                    ku = u64(kk)
                    abase = ku * LDAu + tyu * VMu
                    bbase = ku * BNu + txu * VNu
                    for i in range(TM):
                        a_f[i] = a_s[abase + u64((i // VM) * (TY * VM) + i % VM)]
                    for j in range(TN):
                        b_f[j] = b_s[bbase + u64((j // VN) * (TX * VN) + j % VN)]
                    for i in range(TM):
                        for j in range(TN):
                            acc[i, j] += a_f[i] * b_f[j]
                cuda.syncthreads()
        for i in range(TM):
            r = r0 + (i // VM) * (TY * VM) + ty * VM + i % VM
            if r < r1:
                for j in range(TN):
                    n = n0 + (j // VN) * (TX * VN) + tx * VN + j % VN
                    if n < N:
                        out[r, n] = acc[i, j]

    return cuda.jit(grouped_gemm_kernel)


# ---- host side -----------------------------------------------------------------------------------
def _tables(p: Problem, cfg: TileConfig):
    """Per-expert (address, k stride, n stride) and the tile map, as numpy arrays."""
    E = p.num_experts
    addr = np.zeros(E, np.int64)
    sk = np.zeros(E, np.int64)
    sn = np.zeros(E, np.int64)
    for e, pi, i in p.experts():
        w = p.pieces[pi][1]
        addr[e] = w.data_ptr() + i * w.stride(0) * w.element_size()
        sk[e], sn[e] = w.stride(1), w.stride(2)
    sizes = p.groups.sizes
    per = -(-sizes // cfg.bm)  # m tiles per expert (0 for empty experts)
    tile_e = np.repeat(np.arange(E, dtype=np.int32), per)
    first_tile = np.cumsum(per) - per
    local = np.arange(tile_e.size, dtype=np.int64) - first_tile[tile_e]
    tile_r0 = p.groups.starts[tile_e] + local * cfg.bm
    tile_r1 = p.groups.ends[tile_e].astype(np.int64)
    return addr, sk, sn, tile_e, tile_r0.astype(np.int64), tile_r1


def _sim_register(p: Problem) -> list[int]:
    """Simulator: map every operand address to a flat host view of its elements."""
    keys = []

    def reg(t: torch.Tensor, extent: int) -> None:
        flat = torch.as_strided(t, (extent,), (1,))
        arr = flat.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else flat.numpy()
        a = t.data_ptr()
        old = _SIM_MEM.get(a)
        if old is None or old.size < arr.size:
            _SIM_MEM[a] = arr
        keys.append(a)

    x = p.x
    reg(x, (x.shape[0] - 1) * x.stride(0) + (x.shape[1] - 1) * x.stride(1) + 1)
    for e, pi, i in p.experts():
        w = p.pieces[pi][1][i]
        reg(w, (w.shape[0] - 1) * w.stride(0) + (w.shape[1] - 1) * w.stride(1) + 1)
    return keys


def run(p: Problem, config: str | TileConfig | None = None, info: dict | None = None, *,
        max_grid_y: int = MAX_GRID_Y) -> torch.Tensor:
    """Run ``p`` with the Numba kernel.

    Parameters
    ----------
    p : Problem
        bf16 or float32 operands (fp8 is not supported here). CUDA tensors, or CPU tensors when
        the simulator is on (``NUMBA_ENABLE_CUDASIM=1`` set before numba was imported).
    config : str or TileConfig, optional
        A key of :data:`CONFIGS` or a :class:`TileConfig` (default :data:`DEFAULT_CONFIG`).
    info : dict, optional
        Receives ``method`` ("numba-sim" or "numba") and ``config``.
    max_grid_y : int
        Tiles per launch (default :data:`MAX_GRID_Y`, CUDA's ``gridDim.y`` limit); more tiles
        take several launches. Smaller values only exercise that path (tests).

    Returns
    -------
    torch.Tensor
        ``[T, N]`` in x's dtype (``p.out`` when given).
    """
    cfg = CONFIGS.get(config or DEFAULT_CONFIG) if not isinstance(config, TileConfig) else config
    if cfg is None:
        raise bad_arg("config", config, f"one of {sorted(CONFIGS)} or a TileConfig")
    cfg.check()
    check_int("max_grid_y", max_grid_y, low=1, high=MAX_GRID_Y)
    if p.is_fp8:
        raise BackendUnavailableError("the numba backend supports bf16 and float32 weights, not fp8; "
                                      "use backend='torch' (torch._scaled_grouped_mm) or 'reference'")
    why = unavailable_reason()
    if why:
        raise BackendUnavailableError(f"numba backend: {why}")
    sim = _is_sim()
    if sim and p.device.type != "cpu":
        raise BackendUnavailableError(f"numba simulator (NUMBA_ENABLE_CUDASIM=1) needs CPU tensors, got {p.device}")
    if not sim and p.device.type != "cuda":
        raise BackendUnavailableError(f"numba backend needs CUDA tensors, got {p.device} "
                                      "(or set NUMBA_ENABLE_CUDASIM=1 before importing numba to simulate on CPU)")
    if info is not None:
        info.update(method="numba-sim" if sim else "numba", config=cfg.name)
    T, N, K = p.num_tokens, p.N, p.K
    if p.out is not None and p.out_dtype == torch.float32:
        out32 = p.out
    else:
        out32 = torch.empty(T, N, dtype=torch.float32, device=p.device)
    if T and N:
        if K == 0:
            out32.zero_()
        else:
            _launch(p, cfg, out32, sim, max_grid_y)
    if p.out_dtype == torch.float32:
        return out32
    if p.out is not None:
        return p.out.copy_(out32)
    return out32.to(p.out_dtype)


def _launch(p: Problem, cfg: TileConfig, out32: torch.Tensor, sim: bool, max_y: int) -> None:
    addr, sk, sn, tile_e, tile_r0, tile_r1 = _tables(p, cfg)
    if tile_e.size == 0:
        out32.zero_()
        return
    kern = _kernel(cfg, p.x.dtype == torch.bfloat16, p.wdtype == torch.bfloat16)
    x = p.x
    grid_x = math.ceil(p.N / cfg.bn)
    block = cfg.threads
    scal = (np.int64(x.data_ptr()), np.int64(x.stride(0)), np.int64(x.stride(1)))
    if sim:
        keys = _sim_register(p)
        out_np = out32.numpy()
        try:
            for base in range(0, tile_e.size, max_y):
                gy = min(max_y, tile_e.size - base)
                kern[(grid_x, gy), block](*scal, addr, sk, sn, tile_e, tile_r0, tile_r1, np.int64(base),
                                          out_np, np.int64(p.K), np.int64(p.N))
        finally:
            for a in keys:
                _SIM_MEM.pop(a, None)
        return
    dev = p.device
    tens = [torch.from_numpy(a).to(dev) for a in (addr, sk, sn, tile_e, tile_r0, tile_r1)]
    with cuda.gpus[dev.index if dev.index is not None else torch.cuda.current_device()]:
        stream = cuda.external_stream(torch.cuda.current_stream(dev).cuda_stream)
        d = [cuda.as_cuda_array(t, sync=False) for t in tens]
        d_out = cuda.as_cuda_array(out32, sync=False)
        for base in range(0, tile_e.size, max_y):
            gy = min(max_y, tile_e.size - base)
            kern[(grid_x, gy), block, stream](*scal, *d, np.int64(base), d_out, np.int64(p.K), np.int64(p.N))
