"""Block-FP8 grouped GEMM through cuBLAS: one ``torch._scaled_mm`` per expert (the DeepSeek-V3 recipe).

cuBLAS (12.9+) runs the block-FP8 recipe on Hopper: activations scaled per row and 128 columns,
weights per 128 x 128 block, float32 scales. torch (2.9+) reaches it through ``torch._scaled_mm``
with the scales' shapes and strides naming the recipe: ``scale_a`` ``[M, K/128]`` column-major
(stride ``[1, M]``), ``scale_b`` ``[K/128, N/128]`` column-major with leading dimension ``L4`` =
``K/128`` rounded up to 4 (stride ``[1, L4]``).
There is no grouped form on sm90 (``torch._scaled_grouped_mm`` takes row-wise scales there), so
this path launches one GEMM per expert with rows. It needs the row bounds on the host: one host
wait per call (eager only: never under CUDA graph capture, where the Triton kernel runs) and one
launch per expert (a few microseconds of host time each, which the GPU time of a few hundred rows
per expert covers).

Layout. Each expert's activation scales must be one column-major ``[rows, K/128]`` block whose
leading dimension (the expert's rows) cuBLAS wants 16-byte aligned, so every expert's rows start
at a multiple of :data:`ALIGN` rows of a padded buffer (:func:`layout`); the activations are
quantized straight into it (the gather fused into the quantizer), the scales rewritten expert by
expert (:func:`segment_scales`: one scatter), each expert's GEMM writes its padded block
(:func:`grouped`), and one gather puts the rows back in sorted order. Pad rows are computed and
never read.

Weights are read in place: expert ``e``'s ``[K, N]`` view of its piece (local or prefetched
slot) is the column-major operand cuBLAS takes, its scales ``[N/128, K/128]`` (padded to ``L4``
columns) transposed the column-major ``scale_b``.

:func:`gemm` composes the steps; its ``quantize`` and ``matmul`` arguments (default: the Triton
activation quantizer, ``torch._scaled_mm``) let the CPU tests run the same composition with
reference numerics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..checks import align_up
from .token_groups import upload_ints

__all__ = ["ALIGN", "Layout", "layout", "segment_scales", "grouped", "gemm", "unavailable_reason", "weight_scales",
           "probe_operands"]

#: Rows of each expert's block in the padded buffer are a multiple of this: the activation scales'
#: leading dimension (the block's rows) in 16-byte units of float32 (cuBLAS's alignment).
ALIGN = 4


@dataclass(frozen=True)
class Layout:
    """Where each expert's rows sit in the padded buffer.

    Attributes
    ----------
    starts, rows, padded : list of int
        Per expert: first row in the padded buffer, real rows, padded rows (a multiple of the
        alignment; 0 for an expert without rows).
    total : int
        Rows of the padded buffer.
    num_rows : int
        Real rows (the sorted rows ``0 .. num_rows - 1``).
    dest : torch.Tensor
        int64 ``[num_rows]`` on the device: the padded row of each sorted row.
    start_t, pad_t : torch.Tensor
        int64 ``[E]`` on the device: ``starts`` and ``padded``.
    """

    starts: list
    rows: list
    padded: list
    total: int
    num_rows: int
    dest: torch.Tensor
    start_t: torch.Tensor
    pad_t: torch.Tensor

    @property
    def identity(self) -> bool:
        """True when no row moves (every expert's rows already aligned)."""
        return self.total == self.num_rows


def layout(ends, align: int, device) -> Layout:
    """The padded layout of experts with end offsets ``ends`` (host ints, one per expert).

    The device tensors come from three small host arrays staged through pinned memory: no host wait."""
    ends = [int(v) for v in ends]
    rows = [b - a for a, b in zip([0] + ends[:-1], ends)]
    padded = [align_up(r, align) for r in rows]
    starts, acc = [], 0
    for p in padded:
        starts.append(acc)
        acc += p
    m = ends[-1] if ends else 0
    device = torch.device(device)
    up = upload_ints(np.array([starts, padded, [s - (e - r) for s, e, r in zip(starts, ends, rows)], rows],
                              dtype=np.int64).reshape(4, -1), device).long()
    start_t, pad_t, shift, counts = up
    dest = torch.arange(m, device=device) + torch.repeat_interleave(shift, counts, output_size=m)
    return Layout(starts=starts, rows=rows, padded=padded, total=acc, num_rows=m, dest=dest,
                  start_t=start_t, pad_t=pad_t)


def segment_scales(xs: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Group-major activation scales ``[KB, P]`` (``P`` = ``lay.total``) rewritten expert by expert.

    Returns a flat float32 ``[KB * P]`` tensor in which expert ``e``'s block starts at
    ``starts[e] * KB`` and holds ``[KB, padded[e]]`` row-major: viewed transposed, the
    column-major ``[padded[e], KB]`` scale ``torch._scaled_mm`` takes. One scatter, on ``xs``'s
    device and stream."""
    kb, p = int(xs.shape[0]), int(xs.shape[1])
    dev = xs.device
    pad_t, start_t = lay.pad_t, lay.start_t
    length = torch.repeat_interleave(pad_t, pad_t, output_size=p)          # block rows, per padded row
    base = torch.repeat_interleave(start_t * (kb - 1), pad_t, output_size=p)  # start * KB - start
    j = torch.arange(p, device=dev)
    idx = (base + j)[None, :] + torch.arange(kb, device=dev)[:, None] * length[None, :]
    out = torch.empty(kb * p, dtype=xs.dtype, device=dev)
    out.index_copy_(0, idx.reshape(-1), xs.reshape(-1))
    return out


def weight_scales(scales: torch.Tensor) -> torch.Tensor:
    """``[E, N/128, K/128]`` float32 block scales as ``[E, N/128, L4]`` with ``L4`` = ``K/128`` rounded
    up to 4 (zeros past ``K/128``): ``w[e].t()[:K/128]`` is then the column-major ``scale_b`` of expert
    ``e`` (shape ``[K/128, N/128]``, stride ``[1, L4]``). No copy when the scales are already
    contiguous with ``K/128`` a multiple of 4."""
    e, nb, kb = (int(v) for v in scales.shape)
    l4 = align_up(kb, 4)
    if l4 == kb and scales.is_contiguous() and scales.dtype == torch.float32:
        return scales
    out = torch.zeros(e, nb, l4, dtype=torch.float32, device=scales.device)
    out[:, :, :kb] = scales
    return out


def _expert_weight(pieces: list, e: int) -> torch.Tensor:
    for first, t in pieces:
        if first <= e < first + int(t.shape[0]):
            return t[e - first]
    raise IndexError(f"expert {e} is in no weight piece")


def grouped(xq: torch.Tensor, xs_seg: torch.Tensor, pieces: list, w_scales: torch.Tensor, lay: Layout,
            out: torch.Tensor, matmul: Callable | None = None) -> torch.Tensor:
    """One block-scaled GEMM per expert with rows: ``out[block e] = xq[block e] @ w[e]`` (dequantized).

    Parameters
    ----------
    xq : torch.Tensor
        ``[P, K]`` float8_e4m3fn, row-major, the padded layout.
    xs_seg : torch.Tensor
        From :func:`segment_scales`.
    pieces : list of (int, torch.Tensor)
        Weights ``[count, K, N]`` (logical; column-major per expert, i.e. ``[count, N, K]`` storage).
    w_scales : torch.Tensor
        From :func:`weight_scales`.
    out : torch.Tensor
        ``[P, N]`` bf16, row-major; every expert's block is written (pad rows too).
    matmul : callable, optional
        ``matmul(a, b, scale_a=, scale_b=, out_dtype=, out=)``; default ``torch._scaled_mm``.

    Enqueued on the current stream, one launch per expert with rows; no host wait.
    """
    mm = matmul or torch._scaled_mm
    kb = int(xq.shape[1]) // 128
    for e, (s, p) in enumerate(zip(lay.starts, lay.padded)):
        if p == 0:
            continue
        sa = xs_seg[s * kb:(s + p) * kb].view(kb, p).t()
        mm(xq[s:s + p], _expert_weight(pieces, e), scale_a=sa, scale_b=w_scales[e].t()[:kb],
           out_dtype=out.dtype, out=out[s:s + p])
    return out


def gemm(x: torch.Tensor, ends, pieces: list, scales: torch.Tensor, *, rows: torch.Tensor | None = None,
         top_k: int = 1, out: torch.Tensor | None = None, align: int = ALIGN,
         quantize: Callable | None = None, matmul: Callable | None = None) -> torch.Tensor:
    """Block-FP8 (128 x 128) grouped GEMM on cuBLAS: ``out[rows of e] = quant(x_rows) @ dequant(w[e])``.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, K]`` bf16 activations (K a multiple of 128), sorted by expert, or the un-permuted
        tokens with ``rows``.
    ends : sequence of int
        Host end offsets of the experts' rows (rows from ``ends[-1]`` on are not computed).
    pieces, scales
        The weights (``[count, K, N]`` logical views, fp8) and their ``[E, N/128, K/128]`` float32 scales.
    rows, top_k : optional
        Gather fused into the quantizer: sorted row ``r`` is ``x[rows[r] // top_k]``.
    out : torch.Tensor, optional
        ``[>= ends[-1], N]`` bf16 (rows past ``ends[-1]`` left unwritten).
    align : int
        Rows per expert block are padded to a multiple of this (:data:`ALIGN`).
    quantize, matmul : callable, optional
        ``quantize(x, 128, rows=, top_k=) -> (xq [P, K], xs [K/128, P])`` (default: the Triton
        quantizer) and the per-expert GEMM (default ``torch._scaled_mm``).

    Returns
    -------
    torch.Tensor
        ``[ends[-1] or more, N]`` bf16, enqueued on the current stream. The host does not wait
        here (the caller read ``ends``).
    """
    if quantize is None:
        from .triton_quant import quantize_act as quantize
    dev = x.device
    lay = layout(ends, align, dev)
    n = int(pieces[0][1].shape[-1])
    m = lay.num_rows
    if out is None:
        out = torch.empty(max(m, int(rows.shape[0]) if rows is not None else int(x.shape[0])), n,
                          dtype=torch.bfloat16, device=dev)
    if m == 0:
        return out
    src = rows[:m] if rows is not None else torch.arange(m, device=dev)
    if lay.identity:
        src_p = src
    else:
        src_p = torch.zeros(lay.total, dtype=src.dtype, device=dev)
        src_p[lay.dest] = src
    xq, xs = quantize(x, 128, rows=src_p, top_k=top_k if rows is not None else 1)
    xs_seg = segment_scales(xs, lay)
    ws = weight_scales(scales)
    if lay.identity:
        grouped(xq, xs_seg, pieces, ws, lay, out[:m], matmul)
    else:
        padded = grouped(xq, xs_seg, pieces, ws, lay,
                         torch.empty(lay.total, n, dtype=out.dtype, device=dev), matmul)
        torch.index_select(padded, 0, lay.dest, out=out[:m])
    return out


_PROBED: dict = {}  # device index -> None (runs) or why not


def probe_operands(device) -> tuple:
    """``(a, b, scale_a, scale_b)`` of the availability probe: ``[4, 256] x [256, 256]``, all ones (the
    product is 256 everywhere); two K blocks, so ``scale_b``'s leading dimension (``L4`` = 4) differs
    from its rows (``K/128`` = 2), as in real calls where ``K/128`` is not a multiple of 4."""
    a = torch.ones(4, 256, device=device).to(torch.float8_e4m3fn)
    b = torch.ones(256, 256, device=device).to(torch.float8_e4m3fn).t()   # [K, N] column-major
    sa = torch.ones(2, 4, device=device).t()       # [M=4, K/128=2], stride [1, 4]
    sb = torch.ones(2, 4, device=device).t()[:2]   # [K/128=2, N/128=2], stride [1, L4=4]
    return a, b, sa, sb


def _probe(index: int) -> str | None:
    """Run one tiny block-scaled GEMM on device ``index`` (a host wait, once per device)."""
    if index in _PROBED:
        return _PROBED[index]
    dev = torch.device("cuda", index)
    why = None
    try:
        a, b, sa, sb = probe_operands(dev)
        got = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        torch.cuda.synchronize(dev)
        if not bool((got.float() == 256.0).all()):
            why = "torch._scaled_mm's block-scaled GEMM gave wrong values in the probe"
    except Exception as exc:  # noqa: BLE001 - any failure means the path is not there
        why = f"torch._scaled_mm block-scaled (1x128, 128x128) GEMM failed: {type(exc).__name__}: {str(exc)[:160]}"
    _PROBED[index] = why
    return why


def unavailable_reason(device, n: int, k: int, block_size=(128, 128)) -> str | None:
    """None when :func:`gemm` runs on ``device`` for ``[.., K] x [K, N]`` with ``block_size``, else why not.

    Needs: 128 x 128 blocks; N and K multiples of 128; CUDA sm90 (torch's block-scaled ``_scaled_mm`` recipe is Hopper's); a
    successful probe GEMM (run once per device: a host wait; under CUDA graph capture, an
    unprobed device counts as unavailable)."""
    if tuple(block_size) != (128, 128):
        return f"block_size {tuple(block_size)} (the cuBLAS recipe is 128 x 128)"
    if n % 128 or k % 128:
        return f"N={n}, K={k} (the cuBLAS recipe needs multiples of 128)"
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} (cuBLAS block-FP8 runs on CUDA)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.cuda.get_device_capability(index) != (9, 0):
        return f"compute capability {torch.cuda.get_device_capability(index)} (torch's block-FP8 _scaled_mm is sm90)"
    if index not in _PROBED and torch.cuda.is_current_stream_capturing():
        return "not probed yet, and a CUDA graph capture is running"
    return _probe(index)
