"""Cases and oracles of the cuBLAS block-FP8 path (dwdp_comm.kernels.cublas_fp8), for its CPU and GPU tests.

``ref_scaled_mm`` stands in for ``torch._scaled_mm`` (checking the operand contract of its
block-scaled recipe first), ``ref_quantize`` for the Triton activation quantizer; ``oracle`` is the
float64 product of the dequantized operands.
"""

from __future__ import annotations

import torch

from dwdp_comm.kernels import cublas_fp8, reference


def _meta_like(t):
    return torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device="meta")


def ref_scaled_mm(a, b, *, scale_a, scale_b, out_dtype, out):
    """``torch._scaled_mm``'s block-scaled recipe in float32, after two contract checks: torch's own
    (its meta kernel, on operands of the same shapes, strides and dtypes: it names the recipe from
    the scales' shapes) and the layout cuBLAS documents (scale leading dimensions, 4-row blocks)."""
    m, k = a.shape
    n = b.shape[1]
    kb, l4 = k // 128, -(-(k // 128) // 4) * 4
    got = torch._scaled_mm(_meta_like(a), _meta_like(b), scale_a=_meta_like(scale_a), scale_b=_meta_like(scale_b),
                           out_dtype=out_dtype)  # raises where torch would refuse the call
    assert tuple(got.shape) == (m, n) and got.dtype == out_dtype
    assert a.dtype == torch.float8_e4m3fn and a.stride(1) == 1, (a.dtype, a.stride())
    assert b.dtype == torch.float8_e4m3fn and b.shape[0] == k and b.stride(0) == 1, (b.dtype, b.shape, b.stride())
    assert scale_a.dtype == torch.float32 and tuple(scale_a.shape) == (m, kb), scale_a.shape
    assert scale_a.stride(0) == 1 and (scale_a.stride(1) == m or kb == 1), scale_a.stride()
    assert scale_b.dtype == torch.float32 and tuple(scale_b.shape) == (kb, n // 128), scale_b.shape
    assert scale_b.stride(0) == 1 and scale_b.stride(1) == l4, scale_b.stride()
    assert m % cublas_fp8.ALIGN == 0 and out.is_contiguous() and tuple(out.shape) == (m, n)
    sa = scale_a.repeat_interleave(128, 1)
    sb = scale_b.repeat_interleave(128, 0).repeat_interleave(128, 1)
    out.copy_(((a.float() * sa) @ (b.float() * sb)).to(out_dtype))
    return out


def ref_quantize(x, group, *, rows, top_k):
    q, s = reference.quantize_groupwise(x.float()[torch.div(rows, top_k, rounding_mode="floor")], group)
    return q, s.t().contiguous()


def make_case(seed, counts, k=256, n=384, gather_top_k=None):
    g = torch.Generator().manual_seed(seed)
    e, m = len(counts), sum(counts)
    w = (torch.randn(e, n, k, generator=g) * 3).to(torch.float8_e4m3fn)          # [E, N, K] storage
    ws = torch.rand(e, n // 128, k // 128, generator=g) * 0.02 + 0.001
    ends = torch.tensor(counts).cumsum(0).tolist()
    if gather_top_k:
        tokens = -(-m // gather_top_k)
        x = torch.randn(tokens, k, generator=g).bfloat16()
        rows = torch.randperm(tokens * gather_top_k, generator=g)[:m]
    else:
        x, rows = torch.randn(m, k, generator=g).bfloat16(), None
    return x, rows, ends, w, ws


def oracle(x, rows, top_k, ends, w, ws):
    """float64: quantize the sorted rows as the kernels do, dequantize both sides, multiply per expert."""
    xs = x if rows is None else x[torch.div(rows, top_k, rounding_mode="floor")]
    q, s = reference.quantize_groupwise(xs.float(), 128)
    a = q.double() * s.double().repeat_interleave(128, 1)
    out = torch.zeros(len(xs), w.shape[1], dtype=torch.float64)
    start = 0
    for e, end in enumerate(ends):
        wd = w[e].double() * ws[e].double().repeat_interleave(128, 0).repeat_interleave(128, 1)
        out[start:end] = a[start:end] @ wd.t()
        start = end
    return out


def rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))
