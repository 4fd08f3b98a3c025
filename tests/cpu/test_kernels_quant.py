"""Quantized weights on CPU: the formats and their checks (dwdp_comm.kernels.quant), the grouped GEMM
and experts_forward on every format (dequantize path), and the Triton kernels under TRITON_INTERPRET
where triton is importable."""
import importlib.util
import os

import pytest
import torch

import dwdp_comm as dc
import dwdp_comm.kernels as K
from dwdp_comm import moe
from dwdp_comm.kernels import quant as Q
from dwdp_comm.kernels import reference
from tests.helpers import experts_cases as C
from tests.helpers.kernel_cases import rel_err

FORMATS = ("fp8_channel", "fp8_block", "mxfp4")


def test_e2m1_table_and_e8m0():
    codes = torch.arange(256, dtype=torch.uint8).view(1, 256)
    v = Q.decode_e2m1(codes)
    assert v.shape == (1, 512)
    assert v[0, 2 * 0x21].item() == 0.5 and v[0, 2 * 0x21 + 1].item() == 1.0  # low nibble first
    assert [Q.decode_e2m1(torch.tensor([[c]], dtype=torch.uint8))[0, 0].item() for c in range(16)] == \
        list(Q.E2M1_VALUES)
    s = Q.e8m0_to_float(torch.tensor([0, 126, 127, 128, 254, 255], dtype=torch.uint8))
    assert s[:5].tolist() == [2.0 ** -127, 0.5, 1.0, 2.0, 2.0 ** 127] and torch.isnan(s[5])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n, k", [(256, 256), (200, 2880), (72, 96)])
def test_quantize_dequantize_round_trip(fmt, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, n, k, generator=g) * 0.05
    q, s = Q.quantize(w, fmt)
    assert Q.infer_format(q, s) == fmt and Q.check_format(q, s) == fmt
    d = Q.dequantize(q, s, dtype=torch.float32)
    assert d.shape == w.shape
    assert rel_err(d, w) < (0.2 if fmt == "mxfp4" else 0.05)
    assert torch.equal(Q.dequantize(q[1], s[1], fmt, dtype=torch.float32), d[1])  # one expert, [N, K]
    assert torch.equal(Q.dequantize(q, s, fmt), d.bfloat16())


def test_fp8_block_dequantize_is_blockwise():
    q = torch.ones(1, 130, 260).to(Q.FP8_DTYPE)
    s = torch.arange(1, 1 + 2 * 3, dtype=torch.float32).view(1, 2, 3)
    d = Q.dequantize(q, s, "fp8_block", dtype=torch.float32)[0]
    assert d[0, 0] == 1 and d[127, 127] == 1 and d[0, 128] == 2 and d[0, 259] == 3 and d[128, 0] == 4 and \
        d[129, 259] == 6


@pytest.mark.parametrize("fmt", ["nvfp4", "int4", "awq", "gptq", "bitsandbytes", "fp8", "whatever"])
def test_unsupported_formats_are_named(fmt):
    with pytest.raises(Q.UnsupportedFormatError, match=fr"'{fmt}'.*supported formats: bf16, fp8_channel, "
                       "fp8_block, mxfp4"):
        Q.check_format_name(fmt)
    assert issubclass(Q.UnsupportedFormatError, dc.InvalidArgumentError)


def test_unsupported_dtypes_are_named():
    with pytest.raises(Q.UnsupportedFormatError, match="int32.*AWQ"):
        Q.infer_format(torch.zeros(2, 4, 8, dtype=torch.int32), torch.ones(2, 4, 1))
    with pytest.raises(Q.UnsupportedFormatError, match="NVFP4"):
        Q.infer_format(torch.zeros(2, 4, 8, dtype=torch.uint8), torch.ones(2, 4, 1).to(Q.FP8_DTYPE))
    with pytest.raises(dc.InvalidArgumentError, match="expert_w_scale: got None"):
        Q.infer_format(torch.zeros(2, 4, 8).to(Q.FP8_DTYPE), None, scale_name="expert_w_scale")


def test_check_format_names_shapes_and_dtypes():
    q, s = Q.quantize(torch.randn(2, 256, 384), "fp8_block")
    with pytest.raises(dc.InvalidArgumentError, match=r"w_scale: got 'torch.float32 \[2, 2, 2\]'.*\[2, 2, 3\]"):
        Q.check_format(q, s[:, :, :2], name="w", scale_name="w_scale")
    with pytest.raises(dc.InvalidArgumentError, match=r"w_scale: got 'torch.float16.*float32"):
        Q.check_format(q, s.half(), name="w", scale_name="w_scale")
    with pytest.raises(dc.InvalidArgumentError, match=r"block_size"):
        Q.check_format(q, s, block_size=(128,))
    m, ms = Q.quantize(torch.randn(2, 64, 96), "mxfp4")
    with pytest.raises(dc.InvalidArgumentError, match=r"w: got 'torch.uint8 \[2, 64, 40\]'.*multiple of 32"):
        Q.check_format(m[:, :, :40], ms, "mxfp4", name="w")
    with pytest.raises(dc.InvalidArgumentError, match=r"float8_e4m3fn weights for weight_format='fp8_channel'"):
        Q.check_format(m, ms, "fp8_channel", name="w")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("pieces", [False, True])
def test_grouped_gemm_quantized_matches_dequantized(fmt, pieces, seed):
    g = torch.Generator().manual_seed(seed)
    E, N, Kd, sizes = 4, 96, 320, [5, 0, 11, 7]
    wq, s = Q.quantize(torch.randn(E, N, Kd, generator=g) * 0.05, fmt)
    x = torch.randn(sum(sizes), Kd, generator=g).bfloat16()
    w = wq.transpose(1, 2)  # [E, N, K] storage as the logical [E, K, N]
    ws, ss = ([(0, w[:1]), (1, w[1:].clone())], [s[:3], s[3:]]) if pieces else (w, s)
    info = {}
    out = K.grouped_gemm(x, sizes, ws, weight_scales=ss, info=info)
    assert out.dtype == torch.bfloat16 and out.shape == (sum(sizes), N)
    ref = reference.run(K.make_problem(x, sizes, w, weight_scales=s), out_dtype=torch.float64)
    tol = 2e-2 if info.get("backend") == "reference" or fmt == "mxfp4" else 4e-2  # dequantize: no x quantization
    assert rel_err(out, ref) < tol, info
    assert K.make_problem(x, sizes, w, weight_scales=s).fmt == fmt


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("form", ["whole", "split", "slices", "scale_whole"])
def test_experts_forward_quantized_on_cpu(fmt, form, seed):
    err, info = C.quant_case("cpu", fmt, form=form, bias=form == "split", seed=seed)
    assert err < 2e-2, (err, info)
    assert "dequantized" in info["fallback"] and info["method"] == "grouped"


def test_experts_forward_block_size_and_odd_shapes(seed):
    err, info = C.quant_case("cpu", "fp8_block", H=200, I=72, block_size=(64, 128), gate="interleaved", seed=seed)
    assert err < 2e-2, (err, info)


def test_experts_forward_quantized_bad_arguments():
    x, idx, w = torch.randn(4, 64).bfloat16(), torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
    gu, s1 = Q.quantize(torch.randn(3, 48, 64), "fp8_block")
    dn, s2 = Q.quantize(torch.randn(3, 64, 24), "fp8_block")
    with pytest.raises(dc.InvalidArgumentError, match=r"gate_up_scale \(experts 0..2\): got 'torch.float32 "
                       r"\[3, 1, 2\]'.*\[3, 1, 1\]"):
        moe.experts_forward(x, idx, w, gu, dn, gate_up_scale=torch.ones(3, 1, 2), down_scale=s2)
    with pytest.raises(dc.InvalidArgumentError, match="gate_up_scale: got None"):
        moe.experts_forward(x, idx, w, gu, dn, down_scale=s2)
    with pytest.raises(dc.InvalidArgumentError, match="weight_layout.*'nk' for weight_format='fp8_block'"):
        moe.experts_forward(x, idx, w, gu, dn, gate_up_scale=s1, down_scale=s2, weight_layout="kn")
    with pytest.raises(Q.UnsupportedFormatError, match="nvfp4"):
        moe.experts_forward(x, idx, w, gu, dn, gate_up_scale=s1, down_scale=s2, weight_format="nvfp4")
    with pytest.raises(dc.InvalidArgumentError, match=r"down_scale: got '2 experts'"):
        moe.experts_forward(x, idx, w, gu, dn, gate_up_scale=s1, down_scale=s2[:2])


def test_one_piece_normaliser_forms():
    w = torch.randn(5, 4, 3)
    for form in (w, [(0, w[:2]), (2, w[2:])], [w[0], w[1:4], w[4]], [w[:0], w]):
        pieces = K.normalize_weights(form)
        assert sum(int(t.shape[0]) for _, t in pieces) == 5 and pieces[0][0] == 0
    s = K.normalize_weights([torch.ones(4), torch.ones(2, 4)], "scales", ndim=2, shape="[count, N]")
    assert [(f, tuple(t.shape)) for f, t in s] == [(0, (1, 4)), (1, (2, 4))]
    with pytest.raises(dc.InvalidArgumentError, match=r"gate_up\[1\]\[0\]: got 3, expected 2"):
        moe.experts_forward(torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                            [(0, w[:2]), (3, w[2:])], w.transpose(1, 2))


# ---- Triton kernels in the interpreter (where triton is importable) ------------------------------

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _groups(sizes):
    return torch.tensor(sizes).cumsum(0).to(torch.int32)


@needs_triton
def test_triton_quantize_act_matches_reference(interpret, seed):
    from dwdp_comm.kernels import triton_quant as TQ
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 300, generator=g).bfloat16()
    order = torch.randperm(18, generator=g)
    xq, xs = TQ.quantize_act(x, 128, rows=order, top_k=2, limit=torch.tensor([15], dtype=torch.int32))
    rq, rs = reference.quantize_groupwise(x[order // 2][:15], 128)
    assert torch.allclose(xs[:, :15].t(), rs)  # the scales are equal; the values within one e4m3 step: the
    deq = xq[:15].float() * xs[:, :15].t().repeat_interleave(128, 1)[:, :300]  # interpreter's fp8 cast truncates
    assert rel_err(deq, x[order // 2][:15]) < 0.1  # (bit equality with the reference: tests/gpu/test_quant_gpu.py)


@needs_triton
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("tile_n", [64, 256])  # 64: one weight scale a tile (ONE_BS); 256: a scale a column
def test_triton_fp8_block_gemm(interpret, split, tile_n, seed):
    """N = 300 spans three 128-row scale blocks, each with its own scales (the tile's block index matters)."""
    from dwdp_comm.kernels import triton_quant as TQ
    g = torch.Generator().manual_seed(seed)
    sizes, N, Kd = [7, 0, 20, 3, 9], 300, 200
    wq, s = Q.quantize(torch.randn(5, N, Kd, generator=g) * 0.05, "fp8_block")
    x = torch.randn(sum(sizes) + 3, Kd, generator=g)  # 3 sentinel rows past the groups
    xq, xs = reference.quantize_groupwise(x, 128)
    pieces = [(0, wq[:2]), (2, wq[2:].clone())] if split else [(0, wq)]
    out = TQ.fp8_block_gemm(xq, xs.t().contiguous(), pieces, s, _groups(sizes), config=TQ.Config(16, tile_n, 128))
    p = K.make_problem(x[:sum(sizes)].bfloat16(), sizes, wq.transpose(1, 2), weight_scales=s)
    p.x = x[:sum(sizes)]  # the float32 rows the quantization above saw
    assert rel_err(out[:sum(sizes)], reference.run(p, out_dtype=torch.float64)) < 1e-2


@needs_triton
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("Kd, bk", [(192, 64), (224, 128)])  # 224 / 128: a K tail (GPT-OSS: 2880 / 128)
def test_triton_mxfp4_gemm(interpret, split, swap, Kd, bk, seed):
    """Both orders of the MMA (direct, and swapped: the transposed tile stored back transposed),
    whole and split weights, groups of every size (empty, under and over one tile, N not a tile
    multiple), K a multiple of the step or not: equal to the float64 product of the dequantized
    weights. (The interpreter runs the Triton-ops decode; the PTX one: test_e2m1_ptx.py and the GPU.)"""
    from dwdp_comm.kernels import triton_quant as TQ
    g = torch.Generator().manual_seed(seed)
    sizes, N = [7, 0, 20, 3, 9], 80
    wq, s = Q.quantize(torch.randn(5, N, Kd, generator=g) * 0.05, "mxfp4")
    x = torch.randn(sum(sizes), Kd, generator=g).bfloat16().float()  # float32 MMA: the interpreter's bf16 is not
    pieces = [(0, wq[:3]), (3, wq[3:].clone())] if split else [(0, wq)]
    info = {}
    out = TQ.mxfp4_gemm(x, pieces, s, _groups(sizes), config=TQ.Config(16, 64, bk, swap=swap), info=info)
    assert info["config"].endswith("-swap") == swap and info["decode"] == "triton"
    wd = Q.dequantize(wq, s, "mxfp4", dtype=torch.float32)
    ref = torch.cat([x[a:b].double() @ wd[e].double().t() for e, (a, b) in
                     enumerate(zip([0] + _groups(sizes).tolist()[:-1], _groups(sizes).tolist()))])
    assert rel_err(out, ref) < 1e-2
    assert os.environ["TRITON_INTERPRET"] == "1"


@needs_triton
@pytest.mark.parametrize("fmt", ["fp8_block", "mxfp4"])
def test_triton_path_through_moe_mlp_and_experts_forward(interpret, fmt, seed):
    """The wiring of the Triton path (offsets, scales, expert tables, the gather fused into the
    block-FP8 quantizer, sentinel rows): fused equals gathered bit for bit, split equals whole, and
    experts_forward takes the Triton kernel. (Numerics: tests/gpu/test_quant_gpu.py; the
    interpreter's bf16 and fp8 arithmetic is not the GPU's.)"""
    g = torch.Generator().manual_seed(seed)
    E, H, I, T, k = 6, 256, 160, 21, 3
    gu, s1 = Q.quantize(torch.randn(E, 2 * I, H, generator=g) / 16, fmt)
    dn, s2 = Q.quantize(torch.randn(E, H, I, generator=g) / 12, fmt)
    x = torch.randn(T, H, generator=g).bfloat16()
    idx = torch.randint(0, E, (T, k), generator=g)
    idx[0, 0] = E  # a sentinel
    order = moe.sort_by_expert(idx, E)
    groups = K.TokenGroups(order.offsets, offsets=True)
    args = dict(w13_scales=s1, w2_scales=s2, weight_layout="nk", ignore_tail=True, backend="triton")
    info = {}
    plain = K.moe_mlp(moe.gather_tokens(x, order), groups, gu, dn, info=info, **args)
    assert info["gate_up"]["backend"] == "triton" and info["down"]["backend"] == "triton", info
    fused = K.moe_mlp(x, groups, gu, dn, x_rows=order.order, x_top_k=k, **args)
    split = K.moe_mlp(x, groups, [(0, gu[:2]), (2, gu[2:].clone())], [(0, dn[:5]), (5, dn[5:].clone())],
                      x_rows=order.order, x_top_k=k, **dict(args, w2_scales=[s2[:5], s2[5:]]))
    n = int(order.offsets[-1])
    assert torch.equal(fused[:n], plain[:n]) and torch.equal(split[:n], plain[:n])
    w = torch.rand(T, k, generator=g)
    info = {}
    out = moe.experts_forward(x, idx, w, gu, dn, gate_up_scale=s1, down_scale=s2, info=info)
    assert info["gemm"] == fmt and "fallback" not in info and torch.isfinite(out).all(), info


@needs_triton
@pytest.mark.parametrize("fmt", ["fp8_channel", "fp8_block", "mxfp4"])
def test_triton_dequantize_equals_torch_code(interpret, fmt, seed):
    """The one-pass dequantize kernel (what quant.dequantize runs on CUDA) writes the torch code's
    values, into a slice of a bigger buffer too (rows not a multiple of its block, K of its tile)."""
    from dwdp_comm.kernels import triton_quant as TQ
    g = torch.Generator().manual_seed(seed)
    wq, s = Q.quantize(torch.randn(3, 37, 320, generator=g) / 10, fmt)
    want = Q.dequantize(wq, s, fmt, dtype=torch.float32)
    buf = torch.full((5, 37, 320), float("nan"))
    TQ.dequantize(Q.as_bytes(wq), Q.as_bytes(s), fmt, buf[1:4])
    assert torch.equal(buf[1:4], want) and buf[0].isnan().all() and buf[4].isnan().all()


@needs_triton
def test_triton_expert_table_offsets_and_misaligned_pieces(interpret):
    """Pieces are read through element offsets from the first piece (16-aligned: the kernels keep
    their vector loads); pieces not 16-element aligned to each other are refused, named."""
    from dwdp_comm.errors import BackendUnavailableError
    from dwdp_comm.kernels import triton_quant as TQ
    wq, s = Q.quantize(torch.randn(4, 64, 256) * 0.05, "fp8_block")
    other = wq[2:].clone()
    table = TQ.expert_table([(0, wq[:2]), (2, other)], torch.device("cpu"))
    size = wq.element_size()
    assert table.tolist() == [0, 64 * 256, (other.data_ptr() - wq.data_ptr()) // size,
                              (other.data_ptr() - wq.data_ptr()) // size + 64 * 256]
    raw = torch.empty(2 * 64 * 256 + 1, dtype=torch.uint8).view(torch.float8_e4m3fn)[1:].view(2, 64, 256)
    raw.copy_(wq[2:])
    xq, xs = reference.quantize_groupwise(torch.randn(5, 256), 128)
    with pytest.raises(BackendUnavailableError, match="aligned"):
        TQ.fp8_block_gemm(xq, xs.t().contiguous(), [(0, wq[:2]), (2, raw)], s, _groups([1, 1, 1, 2]))


@pytest.mark.parametrize("fmt", ["fp8_channel", "fp8_block", "mxfp4"])
def test_quantize_is_per_expert(fmt, seed):
    """quantize of a stack equals the stack of each expert's quantize (moe.layers.expert_weights quantizes
    one expert at a time so a full-size layer's float32 copy never has to fit)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 256, 320, generator=g) * 0.05
    q, s = Q.quantize(w, fmt)
    parts = [Q.quantize(w[e:e + 1], fmt) for e in range(3)]
    assert torch.equal(q.view(torch.uint8), torch.cat([p[0] for p in parts]).view(torch.uint8))
    assert torch.equal(s.view(torch.uint8) if s.dtype == torch.uint8 else s, torch.cat([p[1] for p in parts]))


def test_config_decode_is_checked_by_name():
    """``Config.decode`` names itself, what it got and what it takes; the block-FP8 kernel, which has
    no decode choice, refuses a non-default one by its config name instead of ignoring it."""
    from dwdp_comm.errors import BackendUnavailableError
    from dwdp_comm.kernels import triton_quant as TQ
    with pytest.raises(ValueError, match=r"Config.decode: got 'ptx', expected 'asm' or 'triton'"):
        TQ.Config(16, 64, 128, decode="ptx")
    c = TQ.Config(16, 64, 128, decode="triton")
    assert c.name.endswith("-tdec")
    xq = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
    with pytest.raises(BackendUnavailableError, match="16x64x128w4s3-tdec"):
        TQ.fp8_block_gemm(xq, torch.ones(1, 4), [(0, torch.zeros(1, 128, 128, dtype=torch.float8_e4m3fn))],
                          torch.ones(1, 1, 1), torch.tensor([4], dtype=torch.int32), config=c)
