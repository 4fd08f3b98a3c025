"""Reference grouped GEMM: the oracle every fast path is tested against.

Plain torch, one matmul per expert, accumulated in float64 by default (float32 is offered for
large GPU checks). Runs on any device and any strides, reads the weight pieces in place (each
expert's ``[K, N]`` block is upcast on its own, never the whole weight set).
"""

from __future__ import annotations

import torch

from . import quant
from .problem import FP8_DTYPE, Problem

__all__ = ["run", "quantize_rowwise", "quantize_groupwise", "FP8_MAX"]

FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448 for e4m3fn


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row fp8 (e4m3) quantization of activations.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, K]`` bf16 or float32.

    Notes
    -----
    Works in row chunks so that large activations need no full float32 copy.

    Returns
    -------
    xq : torch.Tensor
        ``[T, K]`` float8_e4m3fn, row-major.
    scale : torch.Tensor
        ``[T]`` float32 with ``x ~= xq.float() * scale[:, None]``. All-zero rows get scale 1.
    """
    T, K = x.shape
    if K:
        amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=1).float()  # no |x| temporary
    else:
        amax = torch.zeros(T, device=x.device)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).contiguous()
    xq = torch.empty(T, K, dtype=FP8_DTYPE, device=x.device)
    step = max(1, (64 << 20) // max(1, 4 * K))  # rows per chunk: float32 temporaries stay ~64 MiB
    for r in range(0, T, step):
        xq[r:r + step] = (x[r:r + step].float() / scale[r:r + step, None]).clamp_(-FP8_MAX, FP8_MAX)
    return xq, scale


def quantize_groupwise(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 (e4m3) quantization per row and per ``group`` columns (DeepSeek-V3's 1 x 128).

    Parameters
    ----------
    x : torch.Tensor
        ``[T, K]`` bf16 or float32 (K need not be a multiple of ``group``: the last group is short).

    Returns
    -------
    xq : torch.Tensor
        ``[T, K]`` float8_e4m3fn.
    scale : torch.Tensor
        ``[T, ceil(K / group)]`` float32, ``x ~= xq * scale`` per group (``amax / 448``; all-zero
        groups get 1). The Triton activation quantizer (:mod:`dwdp_comm.kernels.triton_quant`)
        computes the same values.
    """
    T, K = x.shape
    kb = -(-K // group)
    pad = torch.zeros(T, kb * group, dtype=torch.float32, device=x.device)
    pad[:, :K] = x.float()
    amax = pad.view(T, kb, group).abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (pad.view(T, kb, group) / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).view(T, kb * group)[:, :K]
    return q.to(FP8_DTYPE), scale.contiguous()


def run(p: Problem, *, acc_dtype: torch.dtype = torch.float64, out_dtype: torch.dtype | None = None
        ) -> torch.Tensor:
    """Compute ``p`` one expert at a time.

    Parameters
    ----------
    p : Problem
        From :func:`dwdp_comm.kernels.problem.make_problem`.
    acc_dtype : torch.dtype
        Dtype of the math (float64 default; float32 for large GPU checks, with TF32 as the caller
        set it).
    out_dtype : torch.dtype, optional
        Dtype of the result (default ``p.out_dtype``; tests ask for float64 to keep the oracle's
        own rounding out of the comparison).

    Returns
    -------
    torch.Tensor
        ``[T, N]`` on ``x``'s device. Quantized weights are dequantized
        (:func:`dwdp_comm.kernels.quant.dequantize`); ``x`` is quantized as the format's fast path
        does: per row for ``fp8_channel``, per row and ``bk`` columns for ``fp8_block``, not at
        all for ``mxfp4`` (bf16 activations).
    """
    out_dtype = out_dtype or p.out_dtype
    x, xs = p.x, p.x_scales
    if p.is_fp8 and xs is None:
        x, xs = quantize_rowwise(x)
    if p.fmt == "fp8_block":  # activations per token and per bk columns, as the block-fp8 kernel
        xq, xg = quantize_groupwise(x, p.block_size[1])
        x = (xq.float() * xg.repeat_interleave(p.block_size[1], dim=1)[:, :p.K])
    res = torch.zeros(p.num_tokens, p.N, dtype=acc_dtype, device=p.device)
    g = p.groups
    for e, pi, i in p.experts():
        r0, r1 = int(g.starts[e]), int(g.ends[e])
        if r1 == r0:
            continue
        if p.fmt in ("fp8_block", "mxfp4"):  # the [N, K] storage of expert e, dequantized
            w = quant.dequantize(p.pieces[pi][1][i].transpose(0, 1), p.scales[pi][i], p.fmt,
                                 block_size=p.block_size, dtype=torch.float32).to(acc_dtype).t()
        else:
            w = p.pieces[pi][1][i].to(acc_dtype)
        a = x[r0:r1].to(acc_dtype)
        if p.is_fp8:
            w = w * p.scales[pi][i].to(acc_dtype)[None, :]
            a = a * xs[r0:r1].to(acc_dtype)[:, None]
        res[r0:r1] = a @ w
    if p.out is not None and out_dtype == p.out_dtype:
        p.out.copy_(res)
        return p.out
    return res.to(out_dtype)
