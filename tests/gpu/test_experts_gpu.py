"""experts_forward's CUDA fast path (grouped GEMMs, Triton activation and combine, split pieces on worker
streams) against the per-expert reference, on fresh random data."""

import pytest
import torch

from tests.helpers import experts_cases as C  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("form", ["whole", "split", "strided"])
@pytest.mark.parametrize("gate", ["swiglu", "interleaved", "none", "relu_glu"])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_path_matches_reference(dtype, tol, form, gate, bias, seed):
    torch.backends.cuda.matmul.allow_tf32 = False
    err, info = C.case("cuda", dtype, gate=gate, bias=bias, form=form, seed=seed, E=16, T=301, H=128, I=96, k=4)
    assert err < tol, (err, info)
    if dtype == torch.bfloat16 and gate in ("swiglu", "interleaved"):
        assert info["activation"] == "triton" and info["combine"] == "triton", info


@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_large_bf16_no_sync_whole(layout, seed):
    err, info = C.case("cuda", torch.bfloat16, layout=layout, seed=seed, E=64, T=2048, H=512, I=256, k=8)
    assert err < 2e-2 and info["method"] == "grouped"
    torch.cuda.synchronize()
    import dwdp_comm.moe as moe
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(512, 256, generator=g).cuda().bfloat16()
    gu = torch.randn(32, 256, 256, generator=g).cuda().bfloat16()
    dn = torch.randn(32, 256, 128, generator=g).cuda().bfloat16()
    idx = torch.randint(0, 32, (512, 8), generator=g).cuda()
    w = torch.rand(512, 8, generator=g).cuda()
    moe.experts_forward(x, idx, w, gu, dn)  # warm (compiles the kernels)
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe.experts_forward(x, idx, w, gu, dn)  # one tensor: no host sync anywhere
    finally:
        torch.cuda.set_sync_debug_mode(0)
