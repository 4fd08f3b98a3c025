"""The cuBLAS block-FP8 path's layout and composition (dwdp_comm.kernels.cublas_fp8), on CPU.

cuBLAS does not run here: the per-expert GEMM is a float reference that first checks the operand
contract torch._scaled_mm's block-scaled recipe states (row-major fp8 A, column-major fp8 B,
column-major [M, K/128] and [L4, N/128] float32 scales); the activation quantizer is the reference
one. What is checked is everything around them: the padded layout, the scale rewrite, the
per-expert views of weight pieces and scales, the fused gather and the un-padding gather. The GPU
test (tests/gpu/test_quant_gpu.py) runs the real cuBLAS call against the same oracle.
"""

from __future__ import annotations

import pytest
import torch

from dwdp_comm.errors import BackendUnavailableError
from dwdp_comm.kernels import cublas_fp8, quant_gemm
from tests.helpers.cublas_cases import make_case, oracle, ref_quantize, ref_scaled_mm, rel


def test_layout_pads_every_expert_block_to_the_alignment():
    lay = cublas_fp8.layout([3, 3, 11, 16, 17], 4, "cpu")
    assert lay.rows == [3, 0, 8, 5, 1] and lay.padded == [4, 0, 8, 8, 4]
    assert lay.starts == [0, 4, 4, 12, 20] and lay.total == 24 and lay.num_rows == 17 and not lay.identity
    assert lay.dest.tolist() == [0, 1, 2] + list(range(4, 12)) + list(range(12, 17)) + [20]
    same = cublas_fp8.layout([4, 4, 12], 4, "cpu")
    assert same.identity and same.dest.tolist() == list(range(12))
    empty = cublas_fp8.layout([0, 0], 4, "cpu")
    assert empty.total == 0 and empty.num_rows == 0 and empty.dest.numel() == 0


def test_segment_scales_put_each_expert_block_column_major():
    lay = cublas_fp8.layout([3, 3, 8], 4, "cpu")    # padded blocks: [0, 4), none, [4, 12)
    kb, p = 3, lay.total
    xs = torch.arange(kb * p, dtype=torch.float32).view(kb, p)   # value = g * P + padded row
    seg = cublas_fp8.segment_scales(xs, lay)
    for s, pad in zip(lay.starts, lay.padded):
        if pad:
            block = seg[s * kb:(s + pad) * kb].view(kb, pad).t()  # [rows, KB], stride [1, rows]
            assert block.stride() == (1, pad)
            assert torch.equal(block, xs[:, s:s + pad].t()), (s, pad)


@pytest.mark.parametrize("counts,top_k,split", [([3, 0, 8, 5, 1], None, False), ([3, 0, 8, 5, 1], 2, True),
                                                ([4, 8, 4], None, True), ([0, 6, 0, 2], 4, False)])
def test_gemm_matches_the_dequantized_oracle(counts, top_k, split):
    x, rows, ends, w, ws = make_case(sum(counts) * 7 + len(counts), counts, gather_top_k=top_k)
    kn = w.transpose(-1, -2)                              # [E, K, N] logical, column-major per expert
    pieces = [(0, kn[:2].clone()), (2, kn[2:])] if split else [(0, kn)]  # clone: own storage, same strides
    m = ends[-1]
    out = torch.full((m + 3, w.shape[1]), float("nan"), dtype=torch.bfloat16)  # 3 sentinel rows
    got = cublas_fp8.gemm(x, ends, pieces, ws, rows=rows, top_k=top_k or 1, out=out,
                          quantize=ref_quantize, matmul=ref_scaled_mm)
    assert got is out
    assert rel(got[:m], oracle(x, rows, top_k or 1, ends, w, ws)) < 1e-2
    assert torch.isnan(got[m:].float()).all(), "rows past the last expert must stay unwritten"


def test_weight_scales_pad_k_blocks_to_four_without_copying_when_not_needed():
    ws = torch.rand(3, 2, 4)
    assert cublas_fp8.weight_scales(ws) is ws
    odd = torch.rand(3, 2, 5)
    got = cublas_fp8.weight_scales(odd)
    assert got.shape == (3, 2, 8) and torch.equal(got[:, :, :5], odd) and not got[:, :, 5:].any()
    assert got[1].t().stride() == (1, 8)


def test_unavailable_reasons_name_what_is_missing():
    assert "CUDA" in cublas_fp8.unavailable_reason("cpu", 256, 256)
    assert "128 x 128" in cublas_fp8.unavailable_reason("cpu", 256, 256, (64, 64))
    assert "multiples of 128" in cublas_fp8.unavailable_reason("cpu", 200, 256)


def test_rule_picks_cublas_only_where_it_runs(monkeypatch):
    assert quant_gemm.choose_path("fp8_block", "cpu", 10_000, n=256, k=256)[0] == "dequantize"
    monkeypatch.setattr(quant_gemm, "FP8_CUBLAS_MIN_ROWS", 0)
    assert quant_gemm.choose_path("fp8_block", "cpu", 10_000, n=256, k=256)[0] == "dequantize"
    with pytest.raises(BackendUnavailableError, match="cuBLAS path: device cpu"):
        quant_gemm.choose_path("fp8_block", "cpu", 10_000, requested="cublas", n=256, k=256)
    with pytest.raises(BackendUnavailableError, match="N and K not given"):
        quant_gemm.choose_path("fp8_block", "cpu", 10_000, requested="cublas")
    assert quant_gemm.choose_path("mxfp4", "cpu", 10_000, n=256, k=256)[0] == "dequantize"


def test_probe_operands_pass_torchs_own_check():
    """torch._scaled_mm's meta kernel names the recipe from the scales' shapes: the probe's must read as
    block-scaled (1 x 128, 128 x 128). The first probe gave scale_b L4 rows instead of K/128 (torch
    refuses that shape), so on the H100 every cuBLAS test skipped."""
    a, b, sa, sb = cublas_fp8.probe_operands("cpu")
    out = torch.empty(4, 256, dtype=torch.bfloat16)
    ref_scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, out=out)
    assert bool((out.float() == 256.0).all())
