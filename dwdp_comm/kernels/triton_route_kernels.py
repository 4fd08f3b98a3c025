"""The Triton JIT functions of :mod:`dwdp_comm.kernels.triton_route` (which documents them).

Imported only by :func:`dwdp_comm.kernels.triton_route._kernels`, on first use: this module imports
triton at its top (a JIT function calls others through the module's globals).
"""

import triton
import triton.language as tl

__all__ = ["route_kernel", "count_kernel", "place_kernel", "place_chunk", "count_chunks"]


@triton.jit
def place_chunk(p, q, before, total, ids_ptr, w_ptr, x_ptr, rows_ptr, offs_ptr, src_ptr, rw_ptr,
                S, E, K, H, x_stride, out_stride, cols_per,
                CHUNK: tl.constexpr, E_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """Place chunk ``p``'s copies: ``before`` ``[E_PAD]`` copies of each expert in earlier chunks,
    ``total`` ``[E_PAD]`` copies of each expert in all. Program ``(p, 0)`` writes the source offsets
    and routing weights (and ``(0, 0)`` the end offsets); program ``(p, q)`` copies the ``q``-th
    share (``cols_per`` columns) of the chunk's token rows."""
    lanes = tl.arange(0, CHUNK)
    bins = tl.arange(0, E_PAD)
    ends = tl.cumsum(total, 0)
    if (p == 0) & (q == 0):
        tl.store(offs_ptr + bins, ends, mask=bins < E)
    start = ends - total + before  # per expert: its first sorted row not taken by earlier chunks
    i = p.to(tl.int64) * CHUNK + lanes
    m = i < S
    e = tl.load(ids_ptr + i, mask=m, other=-1)
    ok = m & (e >= 0) & (e < E)
    e32 = tl.where(ok, e, E_PAD).to(tl.int32)  # invalid lanes match no bin
    base = tl.gather(start, tl.where(ok, e, 0).to(tl.int32), 0)  # invalid lanes: read, never used
    earlier = (e32[:, None] == e32[None, :]) & (lanes[None, :] < lanes[:, None])
    rank = (base + tl.sum(earlier.to(tl.int32), axis=1)).to(tl.int64)
    if q == 0:
        tl.store(src_ptr + i, tl.where(ok, rank * out_stride, -1), mask=m)
        wv = tl.load(w_ptr + i, mask=ok, other=0.0)
        tl.store(rw_ptr + rank, wv, mask=ok)
    tok = i // K
    c0 = q * cols_per
    c1 = tl.minimum(c0 + cols_per, H)
    for h0 in range(0, cols_per, BLOCK_H):
        cols = c0 + h0 + tl.arange(0, BLOCK_H)
        cm = ok[:, None] & (cols < c1)[None, :]
        v = tl.load(x_ptr + tok[:, None] * x_stride + cols[None, :], mask=cm)
        tl.store(rows_ptr + rank[:, None] * H + cols[None, :], v, mask=cm)


@triton.jit(do_not_specialize=["S", "num_chunks"])  # batch sizes vary: no recompile per size class
def route_kernel(ids_ptr, w_ptr, x_ptr, rows_ptr, offs_ptr, src_ptr, rw_ptr,
                 S, E, K, H, x_stride, out_stride, cols_per, num_chunks,
                 CHUNK: tl.constexpr, E_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """One launch: every program counts all copies itself (a histogram a chunk), then places its chunk."""
    p = tl.program_id(0)
    q = tl.program_id(1)
    before = count_chunks(ids_ptr, 0, p, S, CHUNK, E_PAD)
    total = before + count_chunks(ids_ptr, p, num_chunks, S, CHUNK, E_PAD)
    place_chunk(p, q, before, total, ids_ptr, w_ptr, x_ptr, rows_ptr, offs_ptr, src_ptr, rw_ptr,
                S, E, K, H, x_stride, out_stride, cols_per, CHUNK, E_PAD, BLOCK_H)


@triton.jit
def count_chunks(ids_ptr, c0, c1, S, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    """``[E_PAD]`` copies of each expert in chunks ``c0 .. c1 - 1`` (``tl.histogram``: ids in
    ``[E, E_PAD)`` land in padding bins, which callers never read; negative ids and ids past
    ``E_PAD`` are masked out: a histogram must not see a value outside its bins)."""
    lanes = tl.arange(0, CHUNK)
    acc = tl.zeros([E_PAD], dtype=tl.int32)
    for c in range(c0, c1):
        i = c * CHUNK + lanes  # < MAX_ROWS: int32 is enough
        e = tl.load(ids_ptr + i, mask=i < S, other=-1)
        acc += tl.histogram(e.to(tl.int32), E_PAD, mask=(e >= 0) & (e < E_PAD))
    return acc


@triton.jit(do_not_specialize=["S", "num_chunks"])
def count_kernel(ids_ptr, counts_ptr, S, num_chunks, CHUNK: tl.constexpr, E_PAD: tl.constexpr,
                 PER_BLOCK: tl.constexpr):
    """Two-pass route, pass one: ``counts[b, e]`` copies of expert ``e`` in block ``b`` (``PER_BLOCK``
    chunks of ``CHUNK`` copies)."""
    b = tl.program_id(0)
    c0 = b * PER_BLOCK
    n = count_chunks(ids_ptr, c0, tl.minimum(c0 + PER_BLOCK, num_chunks), S, CHUNK, E_PAD)
    tl.store(counts_ptr + b.to(tl.int64) * E_PAD + tl.arange(0, E_PAD), n)


@triton.jit(do_not_specialize=["S", "num_chunks", "num_blocks"])
def place_kernel(ids_ptr, w_ptr, x_ptr, rows_ptr, offs_ptr, src_ptr, rw_ptr, counts_ptr, incl_ptr,
                 S, E, K, H, x_stride, out_stride, cols_per, num_chunks, num_blocks,
                 CHUNK: tl.constexpr, E_PAD: tl.constexpr, BLOCK_H: tl.constexpr, PER_BLOCK: tl.constexpr):
    """Two-pass route, pass two: ``incl`` is ``counts``' inclusive prefix sum over blocks (its last
    row: the totals). Program ``(p, q)`` takes the counts before its block from them, recounts the
    chunks of its block before its own (fewer than ``PER_BLOCK``) and places chunk ``p``."""
    p = tl.program_id(0)
    q = tl.program_id(1)
    bins = tl.arange(0, E_PAD)
    b = p // PER_BLOCK
    row = b.to(tl.int64) * E_PAD + bins
    before = tl.load(incl_ptr + row) - tl.load(counts_ptr + row)
    before += count_chunks(ids_ptr, b * PER_BLOCK, p, S, CHUNK, E_PAD)
    total = tl.load(incl_ptr + (num_blocks - 1).to(tl.int64) * E_PAD + bins)
    place_chunk(p, q, before, total, ids_ptr, w_ptr, x_ptr, rows_ptr, offs_ptr, src_ptr, rw_ptr,
                S, E, K, H, x_stride, out_stride, cols_per, CHUNK, E_PAD, BLOCK_H)
