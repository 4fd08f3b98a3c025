"""The Triton JIT functions of :mod:`dwdp_comm.kernels.triton_quant` (which documents them).

Imported only by :func:`dwdp_comm.kernels.triton_quant._triton`, on first use: this module imports
triton at its top (a JIT function calls others through the module's globals).
"""

import triton
import triton.language as tl

from . import e2m1_ptx

__all__ = ["tile_ends_kernel", "quant_kernel", "fp8_block_kernel", "mxfp4_kernel", "find_tile", "tile_of", "e2m1_f32",
           "e8m0_f32", "e2m1_halves", "E2M1_BF16_PTX", "dequant_mxfp4_kernel", "dequant_fp8_kernel"]


@triton.jit
def tile_ends_kernel(offs_ptr, out_ptr, E, BM: tl.constexpr, BLOCK_E: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    m = e < E
    end = tl.load(offs_ptr + e, mask=m, other=0)
    start = tl.load(offs_ptr + e - 1, mask=m & (e > 0), other=0)
    tiles = tl.where(m, (end - start + BM - 1) // BM, 0)
    tl.store(out_ptr + e, tl.cumsum(tiles, 0), mask=m)

@triton.jit
def quant_kernel(x_ptr, rows_ptr, xq_ptr, xs_ptr, limit_ptr, M, K, x_stride, top_k,
                  HAS_ROWS: tl.constexpr, HAS_LIMIT: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * NG + tl.arange(0, NG)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    ok = r < M
    if HAS_LIMIT:
        ok = ok & (r < tl.load(limit_ptr).to(tl.int64))
    src = r
    if HAS_ROWS:
        src = tl.load(rows_ptr + r, mask=ok, other=0).to(tl.int64) // top_k
    m = (cols < K) & ok
    v = tl.load(x_ptr + src * x_stride + cols, mask=m, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(v), axis=1)
    # IEEE divisions (div_rn; Triton's '/' on float32 may be approximate): the same bits as
    # dwdp_comm.kernels.reference.quantize_groupwise
    s = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    q = tl.minimum(tl.maximum(tl.math.div_rn(v, s[:, None]), -448.0), 448.0)
    tl.store(xq_ptr + r * K + cols, q.to(tl.float8e4nv), mask=m)
    tl.store(xs_ptr + g.to(tl.int64) * M + r, s, mask=(g * GROUP < K) & ok)

@triton.jit
def find_tile(pid, offs_ptr, tend_ptr, E, max_m_tiles, n_tiles, BM: tl.constexpr, GROUP_M: tl.constexpr,
               LOG_E: tl.constexpr):
    """(expert, first row, end row, n tile, valid) of program ``pid`` (grouped launch order)."""
    in_group = GROUP_M * n_tiles
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(max_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    total = tl.load(tend_ptr + E - 1)
    lo = 0
    hi = E - 1
    for _ in tl.static_range(LOG_E):  # smallest e with tile_end[e] > pid_m
        mid = (lo + hi) // 2
        big = tl.load(tend_ptr + mid) > pid_m
        hi = tl.where(big, mid, hi)
        lo = tl.where(big, lo, mid + 1)
    e = tl.minimum(lo, E - 1)
    t0 = tl.where(e > 0, tl.load(tend_ptr + e - 1, mask=e > 0, other=0), 0)
    r_first = tl.where(e > 0, tl.load(offs_ptr + e - 1, mask=e > 0, other=0), 0)
    r0 = r_first + (pid_m - t0) * BM
    r_end = tl.load(offs_ptr + e)
    return e.to(tl.int64), r0, r_end, pid_n, pid_m < total

@triton.jit
def tile_of(w_ptr, wtab_ptr, offs_ptr, tend_ptr, N, E, max_m_tiles, stride_we, BM: tl.constexpr, BN: tl.constexpr,
            GROUP_M: tl.constexpr, LOG_E: tl.constexpr, USE_TABLE: tl.constexpr):
    """This program's output tile in a grouped GEMM: ``(expert, rows (int64), row mask, n tile,
    columns, column mask, the expert's weight base pointer, valid)``; programs past the last tile
    (the grid is an upper bound) get ``valid`` False and empty masks."""
    e, r0, r_end, pid_n, valid = find_tile(tl.program_id(0), offs_ptr, tend_ptr, E, max_m_tiles, tl.cdiv(N, BN),
                                           BM, GROUP_M, LOG_E)
    rows = r0 + tl.arange(0, BM)
    rmask = (rows < r_end) & valid
    n = pid_n * BN + tl.arange(0, BN)
    if USE_TABLE:  # element offsets from w_ptr, multiples of 16 (checked on the host): keeps 16-byte loads
        wb = w_ptr + tl.multiple_of(tl.load(wtab_ptr + e), 16)
    else:
        wb = w_ptr + e * stride_we
    return e, rows.to(tl.int64), rmask, pid_n, n, n < N, wb, valid


@triton.jit
def fp8_block_kernel(a_ptr, as_ptr, w_ptr, wtab_ptr, ws_ptr, offs_ptr, tend_ptr, out_ptr,
                      M, N, K, E, max_m_tiles, stride_we, stride_wn, stride_wk, ws_se, ws_sn, ws_sk,
                      out_stride, block_n,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                      LOG_E: tl.constexpr, USE_TABLE: tl.constexpr, ONE_BS: tl.constexpr):
    # ONE_BS: the tile's BN columns lie in one block_n block (BN divides block_n), so each K step has
    # one weight scale: a row scale a_s * b_s, one FMA an accumulator value (not two multiplies and an
    # add), and no [BN] scale vector in registers (194 registers against 240 at 64x128x128, sm90). That
    # scalar is loaded one step ahead: loaded in its own step, its latency came before the MMA's issue.
    e, rows64, rmask, pid_n, n, nmask, wb, valid = tile_of(w_ptr, wtab_ptr, offs_ptr, tend_ptr, N, E, max_m_tiles,
                                                           stride_we, BM, BN, GROUP_M, LOG_E, USE_TABLE)
    k = tl.arange(0, BK)
    a_ptrs = a_ptr + rows64[:, None] * K + k[None, :]
    b_ptrs = wb + n[None, :].to(tl.int64) * stride_wn + k[:, None] * stride_wk
    as_ptrs = as_ptr + rows64
    ws_ptrs = ws_ptr + e * ws_se + (n // block_n) * ws_sn
    ws_tile = ws_ptr + e * ws_se + ((pid_n * BN) // block_n) * ws_sn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    n_steps = tl.where(valid, tl.cdiv(K, BK), 0)
    if ONE_BS:
        b_s = tl.load(ws_tile, mask=n_steps > 0, other=0.0)
    for kb in range(0, n_steps):
        kmask = k < K - kb * BK
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb * M, mask=rmask, other=0.0)
        if ONE_BS:
            b_next = tl.load(ws_tile + (kb + 1) * ws_sk, mask=kb + 1 < n_steps, other=0.0)
            acc += tl.dot(a, b) * (a_s * b_s)[:, None]
            b_s = b_next
        else:
            b_s = tl.load(ws_ptrs + kb * ws_sk, mask=nmask, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BK
        b_ptrs += BK * stride_wk
    o = out_ptr + rows64[:, None] * out_stride + n[None, :]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])

@triton.jit
def e2m1_f32(c):
    """float32 values of 4-bit e2m1 codes ``c`` (uint32 0..15), built from bits: a code's magnitude
    bits ``em`` (2-bit exponent e, 1-bit mantissa m) shifted to float32 bits 22..24 plus an exponent
    bias of 126 give 2^(e - 1) x (1 + m / 2) (codes 2..7); codes 0 and 1 (0 and 0.5) are
    ``em x (126 << 23)``: one select. Bit 3, the sign, goes to bit 31."""
    em = c & 7
    mag = tl.where(em > 1, (em << 22) + (126 << 23), em * (126 << 23))
    return (mag | ((c >> 3) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def e8m0_f32(s):
    """float32 ``2^(s - 127)`` of e8m0 exponents ``s`` (any integer type), built as float32 bits
    ``s << 23``: s = 0 reads as 0 and 255 (NaN in the spec) as 254."""
    return (tl.minimum(s.to(tl.uint32), 254) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_scaled(p, s, R: tl.constexpr, C: tl.constexpr):
    """``[R, C]`` float32 values of packed e2m1 bytes ``p`` ``[R, C / 2]`` (element 2j in the low
    nibble) times e8m0 scales ``s`` ``[R, C / 32]`` (2^(s - 127) built as float32 bits ``s << 23``;
    s = 0 reads as 0; 255 as 254): one multiply a value."""
    p = p.to(tl.uint32)
    c = tl.join(p & 15, p >> 4).reshape(R, C)  # element 2j (low nibble), then 2j + 1
    v = e2m1_f32(c).reshape(R, C // 32, 32) * e8m0_f32(s)[:, :, None]
    return v.reshape(R, C)


#: :data:`dwdp_comm.kernels.e2m1_ptx.E2M1_BF16_PTX` as a constexpr (a JIT function reads it as a global).
E2M1_BF16_PTX: tl.constexpr = tl.constexpr(e2m1_ptx.E2M1_BF16_PTX)


@triton.jit
def e2m1_halves(p, sb, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """``(lo, hi)``: ``DTYPE`` values of the low / high nibbles of packed e2m1 bytes ``p`` (uint8, any
    shape) times ``2^(sb - 127)`` (``sb``: uint8 e8m0 per byte, <= 254; 0 reads as 0). ``ASM``: the
    PTX of :data:`E2M1_BF16_PTX` (CUDA, sm_80+, ``DTYPE`` bf16), else Triton ops (the interpreter);
    the same bits, value by value (an elementwise op: correct in any register layout the compiler picks)."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(E2M1_BF16_PTX, "=r,=r,=r,=r,r,r", [p, sb],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        pu = p.to(tl.uint32)
        sc = e8m0_f32(sb)
        lo = (e2m1_f32(pu & 15) * sc).to(DTYPE)
        hi = (e2m1_f32(pu >> 4) * sc).to(DTYPE)
    return lo, hi


@triton.jit
def mxfp4_kernel(a_ptr, a_stride, w_ptr, wtab_ptr, ws_ptr, offs_ptr, tend_ptr, out_ptr,
                 N, K, E, max_m_tiles, stride_we, stride_wn, stride_wk, ws_se, ws_sn, ws_sk, out_stride,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                 LOG_E: tl.constexpr, USE_TABLE: tl.constexpr, SWAP: tl.constexpr, ASM: tl.constexpr):
    # Packed byte j of a row holds elements 2j (low nibble) and 2j + 1 (high): each step decodes the
    # two halves apart (e2m1_halves) and makes two dots, even columns of the activations with the low
    # nibbles, odd with the high (interleaving the halves back would cost register shuffles).
    # SWAP: the transposed product (out^T = w @ x^T, a [BN, BM] accumulator), which makes the decoded
    # weights the MMA's first operand: Hopper's wgmma reads that one from registers, where the decode
    # leaves it, while a second operand must go through shared memory first (the unswapped order).
    e, rows64, rmask, pid_n, n, nmask, wb, valid = tile_of(w_ptr, wtab_ptr, offs_ptr, tend_ptr, N, E, max_m_tiles,
                                                           stride_we, BM, BN, GROUP_M, LOG_E, USE_TABLE)
    n64 = n.to(tl.int64)
    kp = tl.arange(0, BK // 2)
    ka = tl.arange(0, BK)
    a_ptrs = a_ptr + rows64[:, None] * a_stride + ka[None, :]
    w_ptrs = wb + n64[:, None] * stride_wn + kp[None, :] * stride_wk
    s_ptrs = ws_ptr + e * ws_se + n64[:, None] * ws_sn + tl.arange(0, BK // 32)[None, :] * ws_sk
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.where(valid, tl.cdiv(K, BK), 0)):
        kleft = K - kb * BK
        a = tl.load(a_ptrs, mask=rmask[:, None] & (ka < kleft)[None, :], other=0.0)
        p = tl.load(w_ptrs, mask=nmask[:, None] & (kp < kleft // 2)[None, :], other=0)
        s = tl.load(s_ptrs, mask=nmask[:, None] & (tl.arange(0, BK // 32) < kleft // 32)[None, :], other=127)
        sb = tl.broadcast_to(tl.minimum(s, 254).to(tl.uint8)[:, :, None], (BN, BK // 32, 16)).reshape(BN, BK // 2)
        lo, hi = e2m1_halves(p, sb, a_ptr.dtype.element_ty, ASM)  # [BN, BK / 2] each (exact in bf16)
        a_even, a_odd = tl.split(a.reshape(BM, BK // 2, 2))
        if SWAP:
            acc = tl.dot(lo, tl.trans(a_even), acc)
            acc = tl.dot(hi, tl.trans(a_odd), acc)
        else:
            acc = tl.dot(a_even, tl.trans(lo), acc)
            acc = tl.dot(a_odd, tl.trans(hi), acc)
        a_ptrs += BK
        w_ptrs += (BK // 2) * stride_wk
        s_ptrs += (BK // 32) * ws_sk
    if SWAP:
        o = out_ptr + rows64[None, :] * out_stride + n[:, None]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=nmask[:, None] & rmask[None, :])
    else:
        o = out_ptr + rows64[:, None] * out_stride + n[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def dequant_mxfp4_kernel(w_ptr, s_ptr, out_ptr, R, N, KP, sw_e, sw_n, ss_e, ss_n, so_e, so_n,
                         BR: tl.constexpr, BC: tl.constexpr):
    """One pass: ``out[e, n, :] = e2m1(w[e, n, :]) * 2^(s - 127)`` for ``BR`` rows x ``2 BC`` columns."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    e = (r // N).to(tl.int64)
    n = (r % N).to(tl.int64)
    cp = tl.program_id(1) * BC + tl.arange(0, BC)
    ok = (r < R)[:, None]
    m = (cp[None, :] < KP) & ok
    p = tl.load(w_ptr + e[:, None] * sw_e + n[:, None] * sw_n + cp[None, :], mask=m, other=0)
    cs = tl.program_id(1) * (BC // 16) + tl.arange(0, BC // 16)
    sc = tl.load(s_ptr + e[:, None] * ss_e + n[:, None] * ss_n + cs[None, :], mask=(cs[None, :] < KP // 16) & ok, other=127)
    v = e2m1_scaled(p, sc, BR, 2 * BC)
    co = tl.program_id(1) * 2 * BC + tl.arange(0, 2 * BC)
    tl.store(out_ptr + e[:, None] * so_e + n[:, None] * so_n + co[None, :], v.to(out_ptr.dtype.element_ty),
             mask=(co[None, :] < 2 * KP) & ok)


@triton.jit
def dequant_fp8_kernel(w_ptr, s_ptr, out_ptr, R, N, K, sw_e, sw_n, ss_e, ss_n, ss_k, so_e, so_n, block_n, block_k,
                       BR: tl.constexpr, BC: tl.constexpr):
    """One pass: ``out[e, n, k] = w[e, n, k] * s[e, n // block_n, k // block_k]`` (per-channel fp8:
    ``block_n = 1``, ``ss_k = 0``) for ``BR`` rows x ``BC`` columns."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    e = (r // N).to(tl.int64)
    n = (r % N).to(tl.int64)
    k = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (k[None, :] < K) & (r < R)[:, None]
    q = tl.load(w_ptr + e[:, None] * sw_e + n[:, None] * sw_n + k[None, :], mask=m, other=0.0).to(tl.float32)
    sc = tl.load(s_ptr + e[:, None] * ss_e + (n // block_n)[:, None] * ss_n + (k // block_k)[None, :] * ss_k,
                 mask=m, other=0.0)
    tl.store(out_ptr + e[:, None] * so_e + n[:, None] * so_n + k[None, :], (q * sc).to(out_ptr.dtype.element_ty),
             mask=m)
