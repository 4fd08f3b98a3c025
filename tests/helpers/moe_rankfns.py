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
        x_dwdp, x_dep, x_ref = x0, x0, x0
        for l in layers:
            full = {k: (v.to(dtype) if v.dtype == torch.bfloat16 else v)
                    for k, v in moe.expert_weights(cfg, seed, l, range(cfg.num_experts), fmt=fmt).items()}
            x_ref = x_ref + moe.reference_moe(cfg, x_ref, routers[l], shared[l], full, fmt=fmt)
            x_dwdp = x_dwdp + dwdp[l](x_dwdp)
            x_dep = x_dep + dep[l](x_dep)
        errs.append((_rel(x_dwdp, x_ref), _rel(x_dep, x_ref)))
    exposed = pipe.exposed_seconds()
    pipe.close()
    st.close()
    return {"errs": errs, "exposed": exposed}
