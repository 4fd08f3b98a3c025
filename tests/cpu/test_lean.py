"""The lean experts path (dwdp_comm/moe/lean.py) and the fused route (kernels/triton_route.py) on CPU:
against the per-expert reference and the torch route on fresh random data; bad input still reported by
the general path; the host cost harness (perf/host_cost.py) counts what it should.

The Triton parts run here in Triton's interpreter (``TRITON_INTERPRET=1``, set per test) where triton
is installed (CI installs it; else they are skipped); tests/gpu/test_lean_gpu.py runs them compiled.
"""
import importlib.util

import pytest
import torch

import dwdp_comm as dc
from dwdp_comm import moe
from dwdp_comm.kernels import triton_route
from dwdp_comm.moe import lean
from tests.helpers import experts_cases as C


@pytest.fixture
def interpret(monkeypatch):
    """The Triton kernels on CPU tensors, in Triton's interpreter (read at call time)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def needs_triton(fn):
    """Run ``fn`` in Triton's interpreter; skipped where triton is not installed."""
    skip = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
    return skip(pytest.mark.usefixtures("interpret")(fn))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("form", ["whole", "slices", "strided"])
@pytest.mark.parametrize("gate", ["swiglu", "interleaved", "none", "relu_glu"])
@pytest.mark.parametrize("bias", [False, True])
def test_one_tensor_takes_the_lean_path(dtype, tol, form, gate, bias, seed):
    err, info = C.case("cpu", dtype, gate=gate, bias=bias, form=form, seed=seed)
    assert err < tol, (err, info)
    assert info["path"] == "lean" and info["method"] == "grouped" and info["pieces"] == 1, info


def test_split_pieces_and_forced_backends_keep_the_general_path(seed):
    _, info = C.case("cpu", torch.float32, form="split", seed=seed)
    assert "path" not in info and info["method"] == "pieces"
    g = torch.Generator().manual_seed(seed)
    x, idx, w = torch.randn(6, 8, generator=g), torch.randint(0, 3, (6, 2), generator=g), torch.rand(6, 2, generator=g)
    gu, dn = torch.randn(3, 12, 8, generator=g), torch.randn(3, 8, 6, generator=g)
    info = {}
    got = moe.experts_forward(x, idx, w, gu, dn, backend="torch", info=info)
    assert "path" not in info
    assert C.rel(got, moe.experts_forward_reference(x, idx, w, gu, dn)) < 1e-5


@pytest.mark.parametrize("tokens, top_k, experts", [(1, 1, 1), (9, 3, 4), (64, 8, 16), (33, 2, 8)])
def test_route_torch_is_sort_by_expert(tokens, top_k, experts, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 5, generator=g)
    idx = torch.randint(-1, experts + 1, (tokens, top_k), generator=g)  # sentinels on both sides
    w = torch.rand(tokens, top_k, generator=g)
    r, order = lean.route_torch(x, idx, w, experts)
    valid = (idx >= 0) & (idx < experts)
    assert torch.equal(r.offsets, order.offsets)
    assert r.offsets[-1].item() == int(valid.sum())
    n = int(valid.sum())
    rows = torch.where(r.src >= 0, r.src // 5, -1)
    assert torch.equal(rows >= 0, valid)
    tok = torch.arange(tokens).unsqueeze(1).expand(-1, top_k)
    assert torch.equal(r.rows[rows[valid]], x[tok[valid]])  # every copy's row holds its token
    assert torch.equal(r.row_weights[rows[valid]], w[valid])
    assert sorted(rows[valid].tolist()) == list(range(n))


def test_bad_input_is_still_reported_by_name():
    x, w = torch.randn(4, 8), torch.rand(4, 2)
    gu, dn = torch.randn(3, 12, 8), torch.randn(3, 8, 6)
    with pytest.raises(dc.InvalidArgumentError, match="topk_ids"):
        moe.experts_forward(x, torch.zeros(4, 2), w, gu, dn)  # float ids: the lean path declines
    with pytest.raises(dc.InvalidArgumentError, match="x"):
        moe.experts_forward(torch.randn(4, 7), torch.zeros(4, 2, dtype=torch.long), w, gu, dn)
    with pytest.raises(dc.InvalidArgumentError, match="w13|gate_up|N ="):
        moe.experts_forward(x, torch.zeros(4, 2, dtype=torch.long), w, torch.randn(3, 11, 8), torch.randn(3, 8, 5))


def test_lean_declines_what_it_does_not_cover():
    x, idx, w = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
    kw = dict(gate_up_bias=None, down_bias=None, weight_layout="nk", gate="swiglu", act_fn=None,
              out_dtype=torch.float32, info=None)
    assert lean.forward(x, idx.float(), w, torch.randn(3, 12, 8), torch.randn(3, 8, 6), **kw) is None
    assert lean.forward(x, idx, w, torch.randn(3, 12, 7), torch.randn(3, 8, 6), **kw) is None  # K != H
    assert lean.forward(x, idx, w, torch.randn(3, 12, 8), torch.randn(3, 8, 5), **kw) is None  # I != N / 2
    assert lean.forward(x, idx, w, torch.randn(3, 12, 8), torch.randn(2, 8, 6), **kw) is None  # E differs


@needs_triton
@pytest.mark.parametrize("tokens, top_k, experts, hidden", [(1, 1, 1, 4), (5, 2, 4, 8), (53, 3, 8, 200),
                                                             (40, 8, 256, 64), (300, 8, 64, 130)])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_fused_route_matches_the_torch_route(tokens, top_k, experts, hidden, ids_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden + 3, generator=g)[:, 1:1 + hidden]  # a row stride larger than H
    idx = torch.randint(-2, experts + 2, (tokens, top_k), generator=g).to(ids_dtype)
    w = torch.rand(tokens, top_k, generator=g)
    assert triton_route.unavailable_reason(x, tokens * top_k, experts) is None
    got = triton_route.route(x, idx, w, experts)
    want, _ = lean.route_torch(x, idx, w, experts)
    n = int(want.offsets[-1])
    assert torch.equal(got.offsets, want.offsets) and torch.equal(got.src, want.src)
    assert torch.equal(got.rows[:n], want.rows[:n]) and torch.equal(got.row_weights[:n], want.row_weights[:n])


@needs_triton
@pytest.mark.parametrize("tokens, top_k, experts, hidden", [(1, 1, 1, 4), (53, 3, 8, 200), (40, 8, 256, 64),
                                                             (300, 8, 64, 130), (700, 4, 5, 16)])
def test_two_pass_route_matches_the_torch_route(tokens, top_k, experts, hidden, seed):
    """The two-pass form (count per block, prefix sum, place) gives the torch route's order: blocks
    of PER_BLOCK chunks cut at every position (one chunk, part of one block, several blocks and a
    partial last one), sentinels on both sides, a row stride larger than H."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden + 3, generator=g)[:, 1:1 + hidden]
    idx = torch.randint(-2, experts + 2, (tokens, top_k), generator=g)
    w = torch.rand(tokens, top_k, generator=g)
    got = triton_route.route(x, idx, w, experts, passes=2)
    want, _ = lean.route_torch(x, idx, w, experts)
    n = int(want.offsets[-1])
    assert torch.equal(got.offsets, want.offsets) and torch.equal(got.src, want.src)
    assert torch.equal(got.rows[:n], want.rows[:n]) and torch.equal(got.row_weights[:n], want.row_weights[:n])


@needs_triton
def test_count_is_per_block_expert_counts(seed):
    g = torch.Generator().manual_seed(seed)
    per = triton_route.CHUNK * triton_route.PER_BLOCK
    idx = torch.randint(-1, 9, (per * 2 + 37, 1), generator=g)
    got = triton_route.count(idx, 9)
    assert tuple(got.shape) == (3, 32) and got.dtype == torch.int32
    flat = idx.reshape(-1)
    for b in range(3):
        part = flat[b * per:(b + 1) * per]
        assert torch.equal(got[b, :9], torch.bincount(part[part >= 0], minlength=9).int())


def test_route_passes_must_be_none_1_or_2():
    x, idx, w = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
    with pytest.raises(dc.InvalidArgumentError, match=r"passes: got 3, expected None, 1 or 2"):
        triton_route.route(x, idx, w, 3, passes=3)


def test_route_form_rule():
    """One pass up to MAX_WORK and ONE_PASS_MAX_ROWS, two passes past them up to MAX_ROWS, then the torch ops."""
    e = 512
    assert triton_route.MAX_WORK // e <= triton_route.ONE_PASS_MAX_ROWS  # the work bound binds here
    assert triton_route.one_pass(triton_route.MAX_WORK // e, e)
    assert not triton_route.one_pass(triton_route.MAX_WORK // e + 1, e)
    assert not triton_route.one_pass(triton_route.ONE_PASS_MAX_ROWS + 1, 1)
    assert triton_route.fits(triton_route.MAX_ROWS, e) and not triton_route.fits(triton_route.MAX_ROWS + 1, e)
    assert not triton_route.fits(8, triton_route.MAX_EXPERTS + 1)


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("gate", ["swiglu", "interleaved"])
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_fused_lean_path_matches_reference(dtype, tol, gate, layout, seed):
    err, info = C.case("cpu", dtype, gate=gate, layout=layout, seed=seed)
    assert err < tol, (err, info)
    assert info["route"] == info["activation"] == info["combine"] == "triton", info


@needs_triton
def test_above_max_rows_the_torch_route_runs(monkeypatch, seed):
    monkeypatch.setattr(triton_route, "MAX_ROWS", 16)
    err, info = C.case("cpu", torch.float32, T=53, k=3, seed=seed)
    assert err < 1e-5 and info["route"] == "torch" and info["activation"] == "triton", info


def test_host_cost_counts_the_lean_path(tmp_path):
    pytest.importorskip("transformers")
    import json

    from perf import host_cost
    out = tmp_path / "hc.json"
    assert host_cost.main(["--parts", "experts,model", "--families", "qwen3_moe", "--tokens", "16",
                           "--model-tokens", "8", "--calls", "2", "--calls-model", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    exp = {r["variant"]: r for r in rows if r["part"] == "experts"}
    # CPU emulation of the CUDA path: three Triton launches (route, activation, combine), two grouped GEMMs.
    assert exp["ours"]["triton"] == 3 and exp["ours"]["by_op"].get("_grouped_mm") == 2, exp["ours"]
    assert exp["ours"]["launch"] == 2 and exp["ours"]["ops"] < exp["hf"]["ops"], (exp["ours"], exp["hf"])
    model = {r["variant"]: r for r in rows if r["part"] == "model"}
    assert model["ours"]["layers"] == 2 and model["ours"]["experts_ops"] == exp["ours"]["ops"]


def test_a_route_kernel_that_fails_to_build_falls_back_to_torch_ops(monkeypatch, seed, caplog):
    class CompilationError(Exception):
        pass
    CompilationError.__module__ = "triton.compiler.errors"

    def broken(*a, **kw):
        raise CompilationError("ptxas failed")
    monkeypatch.setattr(lean, "route_failures", {})
    monkeypatch.setattr(triton_route, "unavailable_reason", lambda *a, **kw: None)
    monkeypatch.setattr(triton_route, "route", broken)
    err, info = C.case("cpu", torch.float32, seed=seed)
    assert err < 1e-5 and info["route"] == "torch"
    assert "ptxas failed" in lean.route_failures[torch.device("cpu")] and "fused route" in caplog.text
    monkeypatch.setattr(lean, "route_failures", {})
    monkeypatch.setattr(triton_route, "route", lambda *a, **kw: 1 / 0)  # not a build failure: raised
    with pytest.raises(ZeroDivisionError):
        C.case("cpu", torch.float32, seed=seed)
