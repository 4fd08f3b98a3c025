"""The lean experts path on CUDA: the fused route kernel against the torch route, the whole path against
the per-expert reference (five families' gates and layouts), no host sync, CUDA graph capture."""
import pytest
import torch

from dwdp_comm import moe
from dwdp_comm.kernels import triton_route
from dwdp_comm.moe import lean
from tests.helpers import experts_cases as C

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tokens, top_k, experts, hidden", [
    (1, 1, 1, 4), (16, 8, 128, 2048), (128, 8, 128, 2048), (64, 8, 256, 7168), (300, 2, 8, 4096),
    (512, 8, 64, 2048), (77, 4, 384, 96), (20, 8, 512, 64), (5, 3, 7, 33), (1024, 8, 128, 2048),
    (4097, 8, 256, 7168), (16384, 4, 128, 2880), (65536, 8, 128, 256), (3000, 8, 512, 64)])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.float32)])
@pytest.mark.parametrize("passes", [None, 1, 2])
def test_fused_route_matches_the_torch_route(tokens, top_k, experts, hidden, ids_dtype, x_dtype, w_dtype, passes,
                                             seed):
    """Either form (the rule's, one pass where it takes the size, two passes) equals the torch route."""
    s = tokens * top_k
    if passes == 1 and s > triton_route.ONE_PASS_MAX_ROWS:
        pytest.skip("past the one-pass form's size")
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden + 8, device="cuda", generator=g).to(x_dtype)[:, 8:]  # row stride > H
    idx = torch.randint(-2, experts + 2, (tokens, top_k), device="cuda", generator=g).to(ids_dtype)
    w = torch.rand(tokens, top_k, device="cuda", generator=g).to(w_dtype)
    assert triton_route.unavailable_reason(x, s, experts) is None
    got = triton_route.route(x, idx, w, experts, passes=passes)
    want, _ = lean.route_torch(x, idx, w, experts)
    n = int(want.offsets[-1])
    assert torch.equal(got.offsets, want.offsets)
    assert torch.equal(got.src, want.src)
    assert torch.equal(got.rows[:n], want.rows[:n])
    assert torch.equal(got.row_weights[:n], want.row_weights[:n])


@pytest.mark.parametrize("tokens", [1, 16, 100, 1024, 1025, 2048])  # k=8, 64 experts: one pass up to 256 tokens, then two
@pytest.mark.parametrize("gate", ["swiglu", "interleaved", "none", "relu_glu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_lean_path_matches_reference(tokens, gate, bias, layout, seed):
    torch.backends.cuda.matmul.allow_tf32 = False
    err, info = C.case("cuda", torch.bfloat16, gate=gate, bias=bias, layout=layout, seed=seed, E=64, T=tokens,
                       H=256, I=128, k=8)
    assert err < 2e-2, (err, info)
    assert info["path"] == "lean", info
    assert info["route"] == ("triton" if triton_route.fits(tokens * 8, 64) else "torch"), info
    if gate in ("swiglu", "interleaved"):
        assert info["activation"] == "triton" and info["combine"] == "triton", info


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("form", ["whole", "slices", "strided"])
def test_lean_path_forms(dtype, tol, form, seed):
    torch.backends.cuda.matmul.allow_tf32 = False
    err, info = C.case("cuda", dtype, form=form, seed=seed, E=16, T=301, H=128, I=96, k=4)
    assert err < tol and info["path"] == "lean", (err, info)


def _inputs(seed, T=96, E=32, H=256, I=128, k=8):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, H, generator=g).cuda().bfloat16()
    gu = (torch.randn(E, 2 * I, H, generator=g) * 0.05).cuda().bfloat16()
    dn = (torch.randn(E, H, I, generator=g) * 0.05).cuda().bfloat16()
    idx = torch.randint(0, E + 1, (T, k), generator=g).cuda()  # E: a sentinel
    w = torch.rand(T, k, generator=g).cuda()
    return x, idx, w, gu, dn


def test_lean_path_never_syncs(seed):
    x, idx, w, gu, dn = _inputs(seed)
    info = {}
    moe.experts_forward(x, idx, w, gu, dn, info=info)  # warm (compiles, probes)
    assert info["route"] == "triton", info
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe.experts_forward(x, idx, w, gu, dn)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_lean_path_captures_and_replays(seed):
    x, idx, w, gu, dn = _inputs(seed)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe.experts_forward(x, idx, w, gu, dn)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.experts_forward(x, idx, w, gu, dn)
    for i in range(3):
        nx, nidx, nw, _, _ = _inputs(seed + 1 + i)
        x.copy_(nx), idx.copy_(nidx), w.copy_(nw)
        graph.replay()
        want = moe.experts_forward_reference(x, idx, w, gu, dn)
        assert C.rel(out, want) < 2e-2
