"""Per-rank functions for the MoE layer tests (toy DeepSeek-V3 on the sim backend)."""
import torch
import torch.distributed as dist

import dwdp_comm as dc
from dwdp_comm import moe


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def dwdp_vs_dep(group, seed: int, fmt: str, num_layers: int, dtype_name: str):
    dtype = getattr(torch, dtype_name)
    cfg = moe.TOY
    lay = dc.ExpertLayout(cfg.num_experts, group.size, group.rank)
    layers = list(range(num_layers))
    st = dc.WeightStore(group, lay)
    for l in layers:
        for name, t in moe.expert_weights(cfg, seed, l, lay.local_experts, fmt=fmt).items():
            st.register(l, name, t.to(dtype) if t.dtype == torch.bfloat16 else t)
    st.commit()
    pf = dc.Prefetcher(st, depth=2, chunk_nbytes=4096)
    pipe = moe.DwdpPipeline(pf, layers)
    routers = [moe.router_weights(cfg, seed, l) for l in layers]
    shared = [{k: v.to(dtype) for k, v in moe.shared_expert_weights(cfg, seed, l).items()} for l in layers]
    dwdp = [moe.DwdpMoE(cfg, l, routers[l], shared[l], pipe, fmt=fmt) for l in layers]
    dep = [moe.DepMoE(cfg, lay, routers[l], shared[l],
                      {k: (v.to(dtype) if v.dtype == torch.bfloat16 else v)
                       for k, v in moe.expert_weights(cfg, seed, l, lay.local_experts, fmt=fmt).items()},
                      fmt=fmt) for l in layers]
    # Ranks get different numbers of tokens (imbalance), including one rank with a single token.
    g = torch.Generator().manual_seed(seed + group.rank)
    x0 = torch.randn(1 if group.rank == 1 else 9 + 4 * group.rank, cfg.hidden, generator=g).to(dtype)
    pipe.start()
    errs = []
    for it in range(2):  # two iterations: the pipeline wraps around to layer 0
        x_dwdp, x_dep = x0, x0
        e_dwdp = e_dep = 0.0
        for l in layers:
            full = {k: (v.to(dtype) if v.dtype == torch.bfloat16 else v)
                    for k, v in moe.expert_weights(cfg, seed, l, range(cfg.num_experts), fmt=fmt).items()}
            # Each layer against the reference on the very input it saw: through several layers a
            # rounding difference can flip a token's top-k choice later, which says nothing about
            # the weights (examples/deepseek_layer.py checks per layer for the same reason).
            y_dwdp, y_dep = dwdp[l](x_dwdp), dep[l](x_dep)
            e_dwdp = max(e_dwdp, _rel(y_dwdp, moe.reference_moe(cfg, x_dwdp, routers[l], shared[l], full, fmt=fmt)))
            e_dep = max(e_dep, _rel(y_dep, moe.reference_moe(cfg, x_dep, routers[l], shared[l], full, fmt=fmt)))
            x_dwdp, x_dep = x_dwdp + y_dwdp, x_dep + y_dep
        errs.append((e_dwdp, e_dep))
    exposed = pipe.exposed_seconds()
    pipe.close()
    st.close()
    return {"errs": errs, "exposed": exposed}
