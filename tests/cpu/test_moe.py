"""DWDP and DEP MoE layers against the single-place reference, on the sim backend (toy DeepSeek-V3)."""
import pytest
import torch

import dwdp_comm as dc
from dwdp_comm import moe
from tests.helpers import moe_rankfns


@pytest.mark.parametrize("world_size, fmt, dtype, tol", [
    (2, "bf16", "float32", 1e-5),
    (3, "bf16", "bfloat16", 2e-2),
    (4, "fp8", "bfloat16", 2e-2),
    (2, "fp8_block", "bfloat16", 2e-2),
])
def test_dwdp_and_dep_match_reference(world_size, fmt, dtype, tol, seed):
    res = dc.testing.launch(moe_rankfns.dwdp_vs_dep, world_size, seed, fmt, 3, dtype, timeout=240)
    for r in res:
        for e_dwdp, e_dep in r["errs"]:
            assert e_dwdp < tol and e_dep < tol, r["errs"]
        assert r["exposed"] >= 0


def test_router_groups_and_weights():
    cfg = moe.TOY
    logits = torch.randn(50, cfg.num_experts)
    ids, w = moe.route_deepseek(logits, torch.randn(cfg.num_experts), top_k=cfg.top_k, num_groups=cfg.num_groups,
                                topk_groups=cfg.topk_groups, routed_scaling=2.5)
    per_group = cfg.num_experts // cfg.num_groups
    assert ids.shape == (50, cfg.top_k) and torch.allclose(w.sum(-1), torch.full((50,), 2.5))
    assert all(len(set(row)) == cfg.top_k for row in ids.tolist())           # distinct experts
    assert all(len({e // per_group for e in row}) <= cfg.topk_groups for row in ids.tolist())
    with pytest.raises(dc.InvalidArgumentError, match="num_groups"):
        moe.route_deepseek(logits, None, num_groups=5)


def test_permute_round_trip():
    x = torch.randn(7, 5)
    ids = torch.randint(0, 6, (7, 3))
    xs, m, order = moe.permute_tokens(x, ids, 6)
    assert m.tolist() == torch.bincount(ids.reshape(-1), minlength=6).tolist()
    flat = ids.reshape(-1)[order]
    assert torch.all(flat[1:] >= flat[:-1])  # grouped by expert, ascending
    w = torch.rand(7, 3)
    assert torch.allclose(moe.unpermute_tokens(xs, order, w), x * w.sum(-1, keepdim=True), atol=1e-6)


def test_attention_is_causal_per_request():
    cfg = moe.TOY
    att = moe.MLAttention(cfg, moe.attention_weights(cfg, 1, 0, dtype=torch.float32))
    x = torch.randn(20, cfg.hidden)
    y = att(x, [12, 8])
    x2 = x.clone()
    x2[15] += 1.0
    y2 = att(x2, [12, 8])
    assert torch.equal(y[:15], y2[:15])  # earlier tokens and the other request are untouched
    assert not torch.allclose(y[15:], y2[15:])
