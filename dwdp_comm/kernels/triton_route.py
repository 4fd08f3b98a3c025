"""A fused route-permute for small batches (CUDA, Triton; optional): one launch instead of about 15.

At small token counts an experts forward is bound by the host: sorting the ``S = T * top_k``
token copies by expert with torch ops (:func:`dwdp_comm.moe.tokens.sort_by_expert`: masks, a
cast, a stable sort, a binary search for the offsets, a scatter for the inverse, then the row
gather and the routing-weight gather) dispatches about 15 ops, each a kernel launch of a few
microseconds of host time, around a few microseconds of GPU work. :func:`route` does all of it in
one kernel:

- the end offsets per expert (``torch._grouped_mm``'s ``offs``),
- every copy's sorted row, as the element offset ``row * out_stride`` the combine reads
  (:func:`dwdp_comm.kernels.triton_moe.combine`), ``-1`` for sentinel ids,
- the token rows in sorted order (the grouped GEMM's input) and the routing weight of every
  sorted row.

The order is the stable one of :func:`~dwdp_comm.moe.tokens.sort_by_expert` (the reference the
tests compare with): copies of one expert keep their flattened ``(token, slot)`` order. How: the
copies are cut into chunks of ``CHUNK``; program ``(p, q)`` counts the experts of every chunk
(a ``CHUNK x E`` comparison summed per expert), which gives each expert's first row and how many
of its copies precede chunk ``p``; the rank of a copy inside its chunk is a ``CHUNK x CHUNK``
comparison. Every program of column ``q`` repeats that count (cheap for the sizes this runs at)
and copies its share of the hidden columns of chunk ``p``'s rows, so the gather is spread over
the whole GPU. Work per program grows with ``S x E``: past :data:`MAX_WORK` the torch ops are the
cheaper path (:func:`fits`).

Rows of sentinel copies (ids outside ``[0, num_experts)``) are not written: they sort past
``offsets[-1]``, where no grouped GEMM, activation or combine reads.

Triton is imported on first use; :func:`unavailable_reason` also honours
:data:`dwdp_comm.kernels.triton_moe.ENABLED`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import triton_moe

__all__ = ["Route", "route", "fits", "unavailable_reason", "MAX_WORK", "MAX_ROWS", "MAX_EXPERTS", "CHUNK"]

#: Most comparisons a program may make counting the copies: ``S * E_pad`` (``E_pad``: the expert
#: count rounded up to a power of two, at least 32). Every program counts all ``S`` copies against
#: every expert, so the kernel's time grows with ``S * E``: 2**19 is 4K copies of 128 experts
#: (Qwen3-MoE at 512 tokens), 2K of 256 (DeepSeek-V3 at 256 tokens), 16K of 8 (Mixtral at 8K tokens),
#: each a few microseconds, under the torch ops' sort alone. Above it :func:`fits` says no and callers
#: run the torch ops. Read at call time: benchmarks may change it (``perf/bench_route.py`` measures).
MAX_WORK = 2**19
#: Most copies :func:`route` takes whatever the expert count.
MAX_ROWS = 2**14
#: Most experts :func:`route` supports (a ``CHUNK x next_pow2(E)`` comparison per program).
MAX_EXPERTS = 512
CHUNK = 32  # copies per chunk (a power of two): a CHUNK x next_pow2(E) int32 tile per step
BLOCK_H = 128  # hidden columns per gather step


class Route(NamedTuple):
    """What :func:`route` returns (every tensor on ``x``'s device).

    Attributes
    ----------
    rows : torch.Tensor
        ``[S, H]`` token rows in sorted order, ``x``'s dtype; rows ``>= offsets[-1]`` (sentinel
        copies) are not written.
    offsets : torch.Tensor
        ``[E]`` int32 end offsets: expert ``e`` owns sorted rows ``[offsets[e-1], offsets[e])``.
    src : torch.Tensor
        ``[T, k]`` int64: ``row * out_stride`` of every (token, slot)'s sorted row, ``-1`` for
        sentinels (the combine's source offsets).
    row_weights : torch.Tensor
        ``[S]`` routing weight of every sorted row (``top_k_weights``' dtype); sentinel rows not written.
    """

    rows: torch.Tensor
    offsets: torch.Tensor
    src: torch.Tensor
    row_weights: torch.Tensor


@functools.lru_cache(maxsize=None)
def _kernel():
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable: {type(exc).__name__}: {exc}"

    @triton.jit(do_not_specialize=["S", "num_chunks"])  # batch sizes vary: no recompile per size class
    def _route_kernel(ids_ptr, w_ptr, x_ptr, rows_ptr, offs_ptr, src_ptr, rw_ptr,
                      S, E, K, H, x_stride, out_stride, cols_per, num_chunks,
                      CHUNK: tl.constexpr, E_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
        p = tl.program_id(0)
        q = tl.program_id(1)
        lanes = tl.arange(0, CHUNK)
        bins = tl.arange(0, E_PAD)
        # Per (lane, expert) counts, summed over chunks without a reduction per step (elementwise
        # adds only), reduced once over the lanes: before this program's chunk, then in all. Ids
        # outside [0, E) match no bin below E (those past E land in padding bins, after every
        # real expert in the prefix sum), so they need no mask here.
        acc = tl.zeros([CHUNK, E_PAD], dtype=tl.int32)
        for c in range(0, p):
            e = tl.load(ids_ptr + c * CHUNK + lanes)  # chunks before p are full
            acc += (e[:, None] == bins[None, :]).to(tl.int32)
        before = tl.sum(acc, axis=0)
        for c in range(p, num_chunks):
            i = c * CHUNK + lanes
            e = tl.load(ids_ptr + i, mask=i < S, other=-1)
            acc += (e[:, None] == bins[None, :]).to(tl.int32)
        total = tl.sum(acc, axis=0)
        ends = tl.cumsum(total, 0)
        if (p == 0) & (q == 0):
            tl.store(offs_ptr + bins, ends, mask=bins < E)
        start = ends - total + before  # per expert: its first sorted row not taken by earlier chunks
        i = p * CHUNK + lanes
        m = i < S
        e = tl.load(ids_ptr + i, mask=m, other=-1)
        ok = m & (e >= 0) & (e < E)
        e32 = tl.where(ok, e, E_PAD).to(tl.int32)  # invalid lanes match no bin
        base = tl.sum(tl.where(e32[:, None] == bins[None, :], start[None, :], 0), axis=1)
        earlier = (e32[:, None] == e32[None, :]) & (lanes[None, :] < lanes[:, None])
        rank = (base + tl.sum(earlier.to(tl.int32), axis=1)).to(tl.int64)
        if q == 0:
            tl.store(src_ptr + i, tl.where(ok, rank * out_stride, -1), mask=m)
            wv = tl.load(w_ptr + i, mask=ok, other=0.0)
            tl.store(rw_ptr + rank, wv, mask=ok)
        tok = (i // K).to(tl.int64)
        c0 = q * cols_per
        c1 = tl.minimum(c0 + cols_per, H)
        for h0 in range(0, cols_per, BLOCK_H):
            cols = c0 + h0 + tl.arange(0, BLOCK_H)
            cm = ok[:, None] & (cols < c1)[None, :]
            v = tl.load(x_ptr + tok[:, None] * x_stride + cols[None, :], mask=cm)
            tl.store(rows_ptr + rank[:, None] * H + cols[None, :], v, mask=cm)

    return triton, _route_kernel


def _e_pad(num_experts: int) -> int:
    return max(32, 1 << max(0, int(num_experts) - 1).bit_length())


def fits(num_rows: int, num_experts: int) -> bool:
    """True when ``num_rows`` copies over ``num_experts`` are within :data:`MAX_ROWS`,
    :data:`MAX_EXPERTS` and :data:`MAX_WORK` (the sizes where the kernel is the cheaper route)."""
    return 0 < num_experts <= MAX_EXPERTS and num_rows <= MAX_ROWS and num_rows * _e_pad(num_experts) <= MAX_WORK


def unavailable_reason(x: torch.Tensor, num_rows: int, num_experts: int, max_rows: int | None = None) -> str | None:
    """None when :func:`route` runs for ``x`` with ``num_rows`` copies over ``num_experts``, else why not.

    Sizes: :func:`fits`; ``max_rows`` (tests, benchmarks) replaces that rule by ``num_rows <= max_rows``.
    """
    why = triton_moe.unavailable_reason(x)
    if why is not None:
        return why
    if not 0 < num_experts <= MAX_EXPERTS:
        return f"{num_experts} experts (the fused route takes 1 .. {MAX_EXPERTS})"
    if not (fits(num_rows, num_experts) if max_rows is None else num_rows <= max_rows):
        return (f"{num_rows} token copies over {num_experts} experts (past MAX_WORK / MAX_ROWS: the torch ops are "
                "the cheaper route there)")
    if x.stride(-1) != 1:
        return f"x strides {x.stride()} (the fused route needs the hidden dim contiguous)"
    got = _kernel()
    return got if isinstance(got, str) else None


@functools.lru_cache(maxsize=None)
def _num_sms(index: int | None) -> int:
    if index is None or not torch.cuda.is_available():
        return 8  # TRITON_INTERPRET on CPU: any small grid
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def route(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, *,
          out_stride: int | None = None) -> Route:
    """Sort the token copies by expert and gather their rows and weights, in one kernel.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` token rows (bf16, fp16 or float32; hidden dim contiguous, any row stride).
    top_k_index : torch.Tensor
        ``[T, k]`` int64 or int32 expert ids; ids outside ``[0, num_experts)`` are sentinels.
    top_k_weights : torch.Tensor
        ``[T, k]`` routing weights (any float dtype).
    num_experts : int
    out_stride : int, optional
        Row stride (elements) of the tensor the combine will read; default ``H``.

    Returns
    -------
    Route
        Enqueued on the current stream of ``x``'s device; no host synchronisation.

    Notes
    -----
    The caller checks :func:`unavailable_reason` first (shapes are not re-checked here: this is
    the hot path of small batches). Same results as :func:`dwdp_comm.moe.tokens.sort_by_expert`
    followed by the gathers (tested against it on fresh random data).
    """
    triton, kern = _kernel()
    t, hidden = x.shape
    k = int(top_k_index.shape[1])
    s = t * k
    ids = top_k_index if top_k_index.is_contiguous() else top_k_index.contiguous()
    w = top_k_weights if top_k_weights.is_contiguous() else top_k_weights.contiguous()
    dev = x.device
    rows = torch.empty(s, hidden, dtype=x.dtype, device=dev)
    offsets = torch.empty(num_experts, dtype=torch.int32, device=dev)
    src = torch.empty(t, k, dtype=torch.int64, device=dev)
    row_w = torch.empty(s, dtype=w.dtype, device=dev)
    if s == 0:
        return Route(rows, offsets.zero_(), src, row_w)
    chunks = triton.cdiv(s, CHUNK)
    # Enough programs to spread the row copies over the GPU: split the hidden columns.
    split = max(1, min(triton.cdiv(hidden, BLOCK_H), triton.cdiv(2 * _num_sms(dev.index), chunks)))
    cols_per = triton.cdiv(triton.cdiv(hidden, split), BLOCK_H) * BLOCK_H
    split = triton.cdiv(hidden, cols_per)
    e_pad = _e_pad(num_experts)
    kern[(chunks, split)](ids, w, x, rows, offsets, src, row_w, s, num_experts, k, hidden, x.stride(0),
                          hidden if out_stride is None else out_stride, cols_per, chunks,
                          CHUNK=CHUNK, E_PAD=e_pad, BLOCK_H=BLOCK_H, num_warps=4)
    return Route(rows, offsets, src, row_w)
