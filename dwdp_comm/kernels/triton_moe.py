"""Triton kernels for the memory-bound steps of a routed-experts forward (CUDA; optional).

Two one-pass kernels replace chains of torch elementwise ops (each a full pass over
``[rows, N]``):

:func:`gated_activation`
    ``a[r] = silu(g + b_g) * (u + b_u) * w[r]`` from the gate-up result ``h[r]`` (gate and up
    halves concatenated, or interleaved), the expert's bias and the row's routing weight,
    computed in float32 and rounded once. Rows at or past a device-resident row count (the
    sentinel tail of a sorted token batch) are skipped without a host read of that count.
:func:`combine`
    ``out[t] = sum_j w[t, j] * y[src[t, j]]`` (the weighted gather-sum that undoes a token
    permutation), in float32, skipping slots whose source is ``-1``. The sources may live in
    several separate tensors (per-piece GEMM results): each slot names the element offset of its
    row from one base tensor, so no piece is copied into one buffer first.

Triton is imported on the first call only (``import dwdp_comm.kernels`` never imports it).
:func:`unavailable_reason` says whether these kernels run for a tensor; callers fall back to
torch ops otherwise. With ``TRITON_INTERPRET=1`` (tests) they also run on CPU tensors, slowly.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["unavailable_reason", "gated_activation", "combine", "BLOCK", "ENABLED"]

BLOCK = 1024  # columns per program: 128 threads x 8 bf16 (16-byte accesses)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.lru_cache(maxsize=None)
def _triton():
    """``(triton, kernels)`` or the reason Triton cannot be imported."""
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable: {type(exc).__name__}: {exc}"

    @triton.jit
    def _gated_kernel(h_ptr, out_ptr, limit_ptr, w_ptr, b_ptr, e_ptr, inter, h_stride, out_stride,
                      INTERLEAVED: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = cols < inter
        if HAS_LIMIT:
            m = m & (r < tl.load(limit_ptr).to(tl.int64))
        if INTERLEAVED:
            gc = 2 * cols
            uc = 2 * cols + 1
        else:
            gc = cols
            uc = cols + inter
        g = tl.load(h_ptr + r * h_stride + gc, mask=m, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + r * h_stride + uc, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            e = tl.load(e_ptr + r).to(tl.int64)
            g += tl.load(b_ptr + e * (2 * inter) + gc, mask=m, other=0.0).to(tl.float32)
            u += tl.load(b_ptr + e * (2 * inter) + uc, mask=m, other=0.0).to(tl.float32)
        a = g * tl.sigmoid(g) * u
        if HAS_W:
            a = a * tl.load(w_ptr + r).to(tl.float32)
        tl.store(out_ptr + r * out_stride + cols, a.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _combine_kernel(base_ptr, src_ptr, w_ptr, out_ptr, hidden, K: tl.constexpr, HAS_W: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < hidden
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(K):
            s = tl.load(src_ptr + t * K + j)
            ok = s >= 0
            v = tl.load(base_ptr + tl.where(ok, s, 0) + cols, mask=cm & ok, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + t * K + j).to(tl.float32)
            acc += v
        tl.store(out_ptr + t * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=cm)

    return triton, _gated_kernel, _combine_kernel


#: Set False to make every caller take its torch fallback (benchmarks, bisecting).
ENABLED = True


def unavailable_reason(t: torch.Tensor) -> str | None:
    """None when these kernels run on ``t``'s device and dtype, else why not (a fallback is due)."""
    if not ENABLED:
        return "dwdp_comm.kernels.triton_moe.ENABLED is False"
    if t.dtype not in _DTYPES:
        return f"dtype {t.dtype} (Triton kernels here take {[str(d) for d in _DTYPES]})"
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"{t.device.type} tensors (the Triton kernels run on CUDA; TRITON_INTERPRET=1 for tests)"
    got = _triton()
    return got if isinstance(got, str) else None


_DUMMIES: dict = {}  # (device, dtype) -> a 1-element tensor for pointer arguments a launch never reads


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached stand-in for an absent optional pointer (its constexpr flag is off: never read or
    written), so a launch allocates nothing for it (one op less per launch on the host)."""
    t = _DUMMIES.get((device, dtype))
    if t is None:
        t = _DUMMIES[(device, dtype)] = torch.empty(1, dtype=dtype, device=device)
    return t


def _kernels():
    got = _triton()
    if isinstance(got, str):
        from ..errors import BackendUnavailableError
        raise BackendUnavailableError(got)
    return got


def gated_activation(h: torch.Tensor, out: torch.Tensor, *, interleaved: bool = False,
                     limit: torch.Tensor | None = None, row_weights: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, row_experts: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU of the gate-up rows into ``out``, with optional bias and per-row weight (one pass).

    Parameters
    ----------
    h : torch.Tensor
        ``[R, 2I]`` gate-up result, last dim contiguous (any row stride). Concatenated
        (``[gate | up]``) or, with ``interleaved``, gate in even and up in odd columns.
    out : torch.Tensor
        ``[R, I]``, last dim contiguous; written for rows below ``limit`` (all rows without it).
    limit : torch.Tensor, optional
        One-element int device tensor: rows ``>= limit[0]`` are skipped (left unwritten), read on
        the device (no host synchronisation).
    row_weights : torch.Tensor, optional
        ``[R]`` per-row factor (e.g. the routing weight of each sorted row), contiguous.
    bias : torch.Tensor, optional
        ``[E, 2I]`` contiguous gate-up bias, added in float32 before the activation; needs
        ``row_experts`` (``[R]`` contiguous integer expert id of every row below ``limit``).

    Returns
    -------
    torch.Tensor
        ``out``. Enqueued on the current stream of ``h``'s device; the host does not wait.
    """
    triton, kern, _ = _kernels()
    rows, inter = out.shape
    if rows == 0 or inter == 0:
        return out
    assert h.stride(-1) == 1 and out.stride(-1) == 1 and h.shape[1] == 2 * inter and h.shape[0] == rows
    dummy = _dummy(out.device, out.dtype)  # unused pointer args (never an alias of out)
    grid = (rows, triton.cdiv(inter, BLOCK))
    kern[grid](h, out, limit if limit is not None else dummy, row_weights if row_weights is not None else dummy,
               bias if bias is not None else dummy, row_experts if row_experts is not None else dummy,
               inter, h.stride(0), out.stride(0), INTERLEAVED=bool(interleaved), HAS_LIMIT=limit is not None,
               HAS_W=row_weights is not None, HAS_BIAS=bias is not None, BLOCK_N=BLOCK, num_warps=4)
    return out


def combine(base: torch.Tensor, src: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None = None
            ) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * row(src[t, j])`` in float32; ``src == -1`` slots add nothing.

    Parameters
    ----------
    base : torch.Tensor
        Any tensor of the rows' dtype; ``row(s)`` is the ``H`` contiguous elements starting ``s``
        elements from ``base.data_ptr()`` (rows of other allocations are reached with
        their distance from ``base``; pass the lowest-addressed tensor so every offset is >= 0).
    src : torch.Tensor
        ``[T, k]`` contiguous int64 element offsets, ``-1`` for slots that contribute nothing.
    out : torch.Tensor
        ``[T, H]`` contiguous result (any float dtype).
    weights : torch.Tensor, optional
        ``[T, k]`` contiguous combine weights; None sums the rows as they are.

    Returns
    -------
    torch.Tensor
        ``out``, enqueued on the current stream (the host does not wait).
    """
    triton, _, kern = _kernels()
    t, hidden = out.shape
    if t == 0 or hidden == 0:
        return out
    assert src.is_contiguous() and out.is_contiguous() and src.dtype == torch.int64
    k = int(src.shape[1])
    if k == 0:
        return out.zero_()
    grid = (t, triton.cdiv(hidden, BLOCK))
    kern[grid](base, src, weights if weights is not None else _dummy(out.device, torch.float32), out, hidden, K=k,
               HAS_W=weights is not None,
               BLOCK_N=BLOCK, num_warps=4)
    return out
