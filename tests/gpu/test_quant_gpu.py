"""Quantized expert kernels on a GPU against the dequantize reference, on fresh random data.

The Triton activation quantizer (bit-equal to the torch reference), the block-FP8 and MXFP4 grouped
GEMMs (N and K not multiples of the tile, experts without rows, split pieces, every candidate tile
configuration), the grouped GEMM and experts_forward on every format (whole, split, slices, sentinel
ids; Triton and dequantize paths), and one CUDA graph capture + replay per format.
"""

import pytest
import torch

import dwdp_comm.kernels as K
from dwdp_comm import moe
from dwdp_comm.kernels import quant as Q
from dwdp_comm.kernels import quant_gemm, reference
from tests.helpers import experts_cases as C
from tests.helpers.kernel_cases import TOL, random_sizes, rel_err

pytestmark = pytest.mark.gpu
FORMATS = ("fp8_channel", "fp8_block", "mxfp4")


def _need(fmt: str) -> None:
    why = quant_gemm.native_unavailable_reason(fmt, torch.device("cuda"))
    if why:
        pytest.skip(f"{fmt} kernel: {why}")


def _sizes(seed, E, T):
    import numpy as np
    s = random_sizes(np.random.default_rng(seed), E, T, empty_frac=0.3)
    s[1], s[0] = s[1] + s[0], 0  # an expert without rows, always; the sizes still sum to T
    return s


def _configs(kind):
    """The rule's choice (None), one small and one large candidate, and for mxfp4 the first small
    and large swapped ones (the other kernel order) and Triton-decode ones: the bench times the rest."""
    from dwdp_comm.kernels import triton_quant as TQ
    picks = [None, TQ.CANDIDATES[kind]["small"][0], TQ.CANDIDATES[kind]["large"][0]]
    for regime in ("small", "large"):
        picks += [c for c in TQ.CANDIDATES[kind][regime] if c.swap][:1]
        picks += [c for c in TQ.CANDIDATES[kind][regime] if c.decode != "asm"][:1]  # the Triton-ops decode
    return picks


def _ref_rows(x, sizes, wd):
    """float64 reference: rows of expert e times dequantized ``wd[e]`` ([N, K])."""
    ends = torch.tensor(sizes).cumsum(0).tolist()
    out = torch.zeros(x.shape[0], wd.shape[1], dtype=torch.float64, device=x.device)
    for e, (a, b) in enumerate(zip([0] + ends[:-1], ends)):
        if b > a:
            out[a:b] = x[a:b].double() @ wd[e].double().t()
    return out


def test_quantize_act_matches_reference_bitwise(seed):
    _need("fp8_block")
    from dwdp_comm.kernels import triton_quant as TQ
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(37, 2880, generator=g).cuda().bfloat16()
    x[3, :128] = 0  # an all-zero group: scale 1
    order = torch.randperm(37 * 4, generator=g).cuda()
    xq, xs = TQ.quantize_act(x, 128, rows=order, top_k=4, limit=torch.tensor([100], dtype=torch.int32).cuda())
    # the reference on CPU: torch on CUDA divides by a Python scalar as a multiply by its reciprocal
    # (not correctly rounded), the kernel and torch on CPU divide (IEEE)
    rq, rs = reference.quantize_groupwise(x.cpu()[order.cpu() // 4][:100], 128)
    got_s, got_q = xs[:, :100].t().cpu(), xq[:100].view(torch.uint8).cpu()
    bad = (got_s != rs).sum().item()
    assert bad == 0, f"{bad} scales differ, e.g. {got_s[got_s != rs][:4].tolist()} vs {rs[got_s != rs][:4].tolist()}"
    bad = got_q != rq.view(torch.uint8)
    assert not bad.any(), (f"{int(bad.sum())} fp8 codes differ, e.g. {got_q[bad][:4].tolist()} vs "
                           f"{rq.view(torch.uint8)[bad][:4].tolist()}")


@pytest.mark.parametrize("E, N, Kd, T", [(8, 256, 512, 700), (6, 200, 2880, 333), (16, 384, 256, 40)])
@pytest.mark.parametrize("split", [False, True])
def test_fp8_block_gemm_every_config(E, N, Kd, T, split, seed):
    _need("fp8_block")
    from dwdp_comm.kernels import triton_quant as TQ
    g = torch.Generator(device="cpu").manual_seed(seed)
    wq, s = Q.quantize((torch.randn(E, N, Kd, generator=g) / Kd ** 0.5).cuda(), "fp8_block")
    sizes = _sizes(seed, E, T)
    x = torch.randn(T + 5, Kd, generator=g).cuda().bfloat16()  # 5 sentinel rows past the groups
    xq, xs = reference.quantize_groupwise(x, 128)
    ref = _ref_rows(xq.float() * xs.repeat_interleave(128, 1)[:, :Kd], sizes,
                    Q.dequantize(wq, s, "fp8_block", dtype=torch.float32))[:T]
    pieces = [(0, wq[:E // 3]), (E // 3, wq[E // 3:].clone())] if split else [(0, wq)]
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32).cuda()
    for c in _configs("fp8_block"):
        out = TQ.fp8_block_gemm(xq, xs.t().contiguous(), pieces, s, offs, config=c)
        assert rel_err(out[:T], ref) < TOL[torch.bfloat16], (c, sizes, rel_err(out[:T], ref))


@pytest.mark.parametrize("E, N, Kd, T", [(8, 256, 512, 700), (6, 200, 2880, 333), (16, 5760, 2880, 64)])
@pytest.mark.parametrize("split", [False, True])
def test_mxfp4_gemm_every_config(E, N, Kd, T, split, seed):
    _need("mxfp4")
    from dwdp_comm.kernels import triton_quant as TQ
    g = torch.Generator(device="cpu").manual_seed(seed)
    wq, s = Q.quantize((torch.randn(E, N, Kd, generator=g) / Kd ** 0.5).cuda(), "mxfp4")
    sizes = _sizes(seed, E, T)
    x = torch.randn(T + 5, Kd, generator=g).cuda().bfloat16()
    ref = _ref_rows(x, sizes, Q.dequantize(wq, s, "mxfp4", dtype=torch.float32))[:T]
    pieces = [(0, wq[:E // 2]), (E // 2, wq[E // 2:].clone())] if split else [(0, wq)]
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32).cuda()
    for c in _configs("mxfp4"):
        out = TQ.mxfp4_gemm(x, pieces, s, offs, config=c)
        assert rel_err(out[:T], ref) < TOL[torch.bfloat16], (c, sizes, rel_err(out[:T], ref))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_kernel_matches_torch_reference(fmt, seed):
    """The one-pass Triton dequantize on CUDA against the torch code on CPU, bit for bit (float32)."""
    _need("fp8_block" if fmt != "mxfp4" else "mxfp4")
    g = torch.Generator(device="cpu").manual_seed(seed)
    wq, s = Q.quantize(torch.randn(5, 200, 2880, generator=g) / 50, fmt)
    want = Q.dequantize(wq, s, fmt, dtype=torch.float32)
    got = Q.dequantize(wq.cuda(), s.cuda(), fmt, dtype=torch.float32).cpu()
    bad = got != want
    if fmt == "mxfp4":  # e8m0 code 0: the kernel reads 2^-127 as 0
        bad &= ~(s.repeat_interleave(32, -1) == 0)
    assert not bad.any(), f"{int(bad.sum())} values differ, e.g. {got[bad][:4].tolist()} vs {want[bad][:4].tolist()}"
    buf = torch.full((7, 200, 2880), float("nan"), dtype=torch.bfloat16, device="cuda")
    Q.dequantize(wq[1:4].cuda(), s[1:4].cuda(), fmt, out=buf[2:5])
    assert torch.equal(buf[2:5].cpu(), want[1:4].bfloat16()) and buf[:2].isnan().all() and buf[5:].isnan().all()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_grouped_gemm_quantized(fmt, backend, seed):
    _need(fmt)
    g = torch.Generator(device="cpu").manual_seed(seed)
    E, N, Kd, T = 8, 320, 640, 500
    wq, s = Q.quantize((torch.randn(E, N, Kd, generator=g) / Kd ** 0.5).cuda(), fmt)
    sizes = _sizes(seed, E, T)
    x = torch.randn(T, Kd, generator=g).cuda().bfloat16()
    w = wq.transpose(1, 2)
    info = {}
    out = K.grouped_gemm(x, sizes, [(0, w[:3]), (3, w[3:].clone())], weight_scales=[s[:3], s[3:]],
                         backend=backend, info=info)
    ref = reference.run(K.make_problem(x, sizes, w, weight_scales=s), out_dtype=torch.float64)
    # the dequantize path keeps bf16 activations; the reference quantizes fp8 ones as the kernels do
    tol = 4e-2 if "dequantize" in str(info.get("method")) and fmt != "mxfp4" else TOL[torch.bfloat16]
    assert rel_err(out, ref) < tol, info
    if backend == "auto" and fmt in ("fp8_block", "mxfp4"):
        assert info["backend"] == "triton", info


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("form, gate", [("whole", "swiglu"), ("split", "interleaved"), ("slices", "swiglu"),
                                        ("scale_whole", "interleaved")])
def test_experts_forward_quantized(fmt, form, gate, seed, monkeypatch):
    _need(fmt)
    # 75 rows per expert: pin the rule so mxfp4 runs its in-kernel decode (the dequantize path has its own test)
    monkeypatch.setattr(quant_gemm, "MXFP4_DEQUANT_MIN_ROWS", 1 << 30)
    err, info = C.quant_case("cuda", fmt, form=form, gate=gate, bias=form == "split", seed=seed, E=16, T=301,
                             H=512, I=384, k=4)
    assert err < 2e-2, (err, info)
    assert "fallback" not in info, info
    assert info["method"] == ("pieces" if fmt == "fp8_channel" and form == "split" else "grouped"), info
    assert info["activation"] == "triton" and info["combine"] == "triton", info


@pytest.mark.parametrize("fmt", ["fp8_block", "mxfp4"])
def test_experts_forward_odd_shapes_and_dequantize_path(fmt, seed, monkeypatch):
    _need(fmt)
    err, info = C.quant_case("cuda", fmt, seed=seed, E=12, T=97, H=2880, I=2880 // 2 + 32, k=4)
    assert err < 2e-2 and "fallback" not in info, (err, info)
    monkeypatch.setattr(quant_gemm, "MXFP4_DEQUANT_MIN_ROWS", 0)  # mxfp4: the rule picks the bf16 path
    monkeypatch.setattr(quant_gemm, "native_unavailable_reason",
                        (lambda f, d, b=None: "forced") if fmt == "fp8_block" else quant_gemm.native_unavailable_reason)
    err, info = C.quant_case("cuda", fmt, seed=seed, E=12, T=97, H=2880, I=1472, k=4, quantize_activations=False)
    assert err < 2e-2 and "dequantized" in info["fallback"], (err, info)


def _graph_case(fmt, seed, split):
    g = torch.Generator(device="cpu").manual_seed(seed)
    E, T, H, I, k = 16, 256, 512, 256, 4
    gu, s1 = Q.quantize((torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).cuda(), fmt)
    dn, s2 = Q.quantize((torch.randn(E, H, I, generator=g) / I ** 0.5).cuda(), fmt)
    if split:  # pieces the Triton kernels read in place (no host row bounds)
        gu, dn = [(0, gu[:5]), (5, gu[5:].clone())], [(0, dn[:9]), (9, dn[9:].clone())]
        s1, s2 = [(0, s1[:5]), (5, s1[5:].clone())], [(0, s2[:9]), (9, s2[9:].clone())]

    def inputs(i):
        gg = torch.Generator(device="cpu").manual_seed(seed + 1 + i)
        idx = torch.randint(0, E, (T, k), generator=gg)
        idx[0, 0] = E  # a sentinel
        return (torch.randn(T, H, generator=gg).cuda().bfloat16(), idx.cuda(), torch.rand(T, k, generator=gg).cuda())
    return gu, dn, s1, s2, inputs


def test_fp8_channel_is_refused_under_capture(seed):
    """Per-channel fp8 runs torch's scaled grouped GEMM per segment, which reads the row counts on the host:
    under capture it raises GraphCaptureError before any illegal call, and the stream works after."""
    _need("fp8_channel")
    if torch.cuda.get_device_capability(0)[0] not in (9, 10):
        pytest.skip("needs sm90 / sm100")
    from dwdp_comm.errors import GraphCaptureError
    gu, dn, s1, s2, inputs = _graph_case("fp8_channel", seed, False)
    x, idx, w = inputs(-1)
    moe.experts_forward(x, idx, w, gu, dn, gate_up_scale=s1, down_scale=s2)  # eagerly: fine
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(GraphCaptureError):
        with torch.cuda.graph(graph):
            moe.experts_forward(x, idx, w, gu, dn, gate_up_scale=s1, down_scale=s2)
    y = moe.experts_forward(x, idx, w, gu, dn, gate_up_scale=s1, down_scale=s2)
    torch.cuda.synchronize()
    assert bool(torch.isfinite(y.float()).all())


@pytest.mark.parametrize("fmt, split", [("fp8_block", False), ("fp8_block", True), ("mxfp4", False), ("mxfp4", True)])
def test_cuda_graph_capture_and_replay(fmt, split, seed):
    _need(fmt)
    gu, dn, s1, s2, inputs = _graph_case(fmt, seed, split)
    sx, sidx, sw = (t.clone() for t in inputs(-1))

    def fwd(x, idx, w):
        return moe.experts_forward(x, idx, w, gu, dn, gate_up_scale=s1, down_scale=s2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: probes, compilation, expert tables, eagerly
        fwd(sx, sidx, sw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sy = fwd(sx, sidx, sw)
    for i in range(3):
        x, idx, w = inputs(i)
        sx.copy_(x), sidx.copy_(idx), sw.copy_(w)
        graph.replay()
        want = fwd(x, idx, w)
        torch.cuda.synchronize()
        diff = sy != want
        assert not diff.any(), (f"{fmt} split={split} replay {i}: {int(diff.sum())} values differ in rows "
                                f"{diff.any(1).nonzero().flatten()[:8].tolist()}; NaN graph/eager "
                                f"{int(sy.isnan().sum())}/{int(want.isnan().sum())}; max |diff| "
                                f"{float((sy.float() - want.float()).abs().nan_to_num(float('inf')).max())}")


def _need_cublas():
    from dwdp_comm.kernels import cublas_fp8
    why = cublas_fp8.unavailable_reason(torch.device("cuda"), 256, 256)
    if why:
        pytest.skip(f"cuBLAS block-FP8: {why}")


@pytest.mark.parametrize("counts, top_k, split", [([3, 0, 8, 5, 1], None, False), ([13, 0, 130, 7], 2, True),
                                                  ([4, 8, 4], None, True)])
def test_cublas_fp8_gemm_matches_oracle(counts, top_k, split):
    """The cuBLAS per-expert path (real quantizer, real torch._scaled_mm) against the float64 oracle,
    rows per expert not multiples of 4, a fused gather, weight pieces in separate allocations."""
    _need_cublas()
    from dwdp_comm.kernels import cublas_fp8
    from tests.helpers.cublas_cases import make_case, oracle, ref_scaled_mm
    x, rows, ends, w, ws = make_case(sum(counts) + len(counts), counts, gather_top_k=top_k)
    want = oracle(x, rows, top_k or 1, ends, w, ws)
    x, w, ws = x.cuda(), w.cuda(), ws.cuda()
    rows = rows.cuda() if rows is not None else None
    kn = w.transpose(-1, -2)
    pieces = [(0, kn[:2].clone()), (2, kn[2:])] if split else [(0, kn)]
    m = ends[-1]
    out = torch.full((m + 2, w.shape[1]), float("nan"), dtype=torch.bfloat16, device="cuda")
    got = cublas_fp8.gemm(x, ends, pieces, ws, rows=rows, top_k=top_k or 1, out=out)
    also = cublas_fp8.gemm(x, ends, pieces, ws, rows=rows, top_k=top_k or 1, quantize=ref_quantize_cuda,
                           matmul=ref_scaled_mm)
    torch.cuda.synchronize()
    assert rel_err(got[:m], want.cuda()) < 1e-2
    assert rel_err(also[:m], want.cuda()) < 1e-2  # the CPU tests' stand-ins agree on the GPU too
    assert torch.isnan(got[m:].float()).all()


def ref_quantize_cuda(x, group, *, rows, top_k):
    from tests.helpers.cublas_cases import ref_quantize
    q, s = ref_quantize(x.cpu(), group, rows=rows.cpu(), top_k=top_k)
    return q.cuda(), s.cuda()


def test_experts_forward_on_the_cublas_path(seed, monkeypatch):
    """experts_forward with the rule pinned to the cuBLAS path (eager), whole and split weights; under
    CUDA graph capture the same call takes the Triton kernel (the cuBLAS path reads row bounds on the host)."""
    _need_cublas()
    monkeypatch.setattr(quant_gemm, "FP8_CUBLAS_MIN_ROWS", 0)
    for form in ("whole", "split"):
        err, info = C.quant_case("cuda", "fp8_block", form=form, seed=seed, E=8, T=301, H=256, I=256, k=4)
        assert err < 2e-2 and "fallback" not in info, (form, err, info)
    gu, dn, s1, s2, inputs = _graph_case("fp8_block", seed, False)
    x, idx, w = inputs(-1)
    eager = moe.experts_forward(x, idx, w, gu, dn, gate_up_scale=s1, down_scale=s2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        moe.experts_forward(x, idx, w, gu, dn, gate_up_scale=s1, down_scale=s2)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sy = moe.experts_forward(x, idx, w, gu, dn, gate_up_scale=s1, down_scale=s2)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(sy, eager.double()) < 2e-2
