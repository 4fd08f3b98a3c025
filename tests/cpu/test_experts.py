"""experts_forward (fast path, CPU) vs the per-expert reference and vs transformers' own grouped_mm forward."""
import pytest
import torch

import dwdp_comm as dc
from dwdp_comm import moe
from tests.helpers import experts_cases as C  # noqa: E402


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("form", ["whole", "split", "slices", "strided"])
@pytest.mark.parametrize("gate", ["swiglu", "interleaved", "none", "relu_glu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_fast_path_matches_reference(dtype, tol, form, gate, bias, layout, seed):
    err, info = C.case("cpu", dtype, gate=gate, bias=bias, form=form, layout=layout, seed=seed)
    assert err < tol, (err, info)
    assert info["method"] == ("pieces" if form == "split" else "grouped")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("gate", ["swiglu", "interleaved", "relu_glu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_split_pieces_through_one_moe_mlp(dtype, tol, gate, bias, layout, seed):
    err, info = C.case("cpu", dtype, gate=gate, bias=bias, form="split", layout=layout, seed=seed, split_path="moe_mlp")
    assert err < tol, (err, info)
    assert info["method"] == "pieces_moe_mlp"


def test_matches_hf_grouped_mm_fp32(seed):
    transformers = pytest.importorskip("transformers")
    from transformers.integrations import moe as hfmoe
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    cfg = transformers.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    m = Qwen3MoeExperts(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(40, 32)
    idx = torch.randint(0, 8, (40, 3))
    idx[3, 1] = 8  # a sentinel, as HF's EP path sends them ...
    w = torch.rand(40, 3)
    w[3, 1] = 0.0  # ... with a zero weight (HF's EP router masks it; HF's grouped_mm clamps the id, so a
    # non-zero weight would add a real expert's output there, which is not the contract either side follows)
    want = hfmoe.grouped_mm_experts_forward(m, x, idx, w)
    got = moe.experts_forward(x, idx, w, m.gate_up_proj.data, m.down_proj.data, act_fn=m.act_fn)
    assert C.rel(got, want) < 1e-5


def test_bad_arguments():
    x, idx, w = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
    gu, dn = torch.randn(3, 12, 8), torch.randn(3, 8, 6)
    with pytest.raises(dc.InvalidArgumentError, match="weight_layout"):
        moe.experts_forward(x, idx, w, gu, dn, weight_layout="kk")
    with pytest.raises(dc.InvalidArgumentError, match="gate"):
        moe.experts_forward(x, idx, w, gu, dn, gate="geglu")
    with pytest.raises(dc.InvalidArgumentError, match="down"):
        moe.experts_forward(x, idx, w, gu, dn[:2])
    with pytest.raises(dc.InvalidArgumentError, match="split_path"):
        moe.experts_forward(x, idx, w, gu, dn, split_path="merged")
    with pytest.raises(dc.InvalidArgumentError, match="top_k_weights"):
        moe.experts_forward(x, idx, w[:, :1], gu, dn)
    with pytest.raises(dc.InvalidArgumentError, match="gate_up"):
        moe.experts_forward(x, idx, w, [(1, gu)], dn)


def test_tokens_round_trip_with_sentinels(seed):
    torch.manual_seed(seed)
    x = torch.randn(9, 5)
    ids = torch.randint(0, 4, (9, 3))
    ids[2, 0] = 4
    ids[4, 2] = -2
    xs, m, order, eid = moe.permute_tokens(x, ids, 4, return_expert_ids=True)
    valid = (ids >= 0) & (ids < 4)
    assert m.tolist() == torch.bincount(ids[valid], minlength=4).tolist()
    assert eid.tolist() == sorted(eid.tolist()) and (eid == 4).sum() == 2
    w = torch.rand(9, 3)
    got = moe.unpermute_tokens(xs, order, w, num_rows=int(m.sum()))
    assert torch.allclose(got, x * (w * valid).sum(-1, keepdim=True), atol=1e-6)
