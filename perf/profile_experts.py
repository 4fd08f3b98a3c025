"""Where the time of :func:`dwdp_comm.moe.experts_forward` goes: host vs GPU, whole vs split weights.

For one MoE shape (default Qwen3-30B-A3B experts: E=128, H=2048, I=768, top-8) and token count, per
variant (whole weights; 4 pieces in separate allocations): host time per call (launch only, no
sync), GPU time per call in a sustained run (CUDA events), and a torch.profiler table of the split
variant (top ops by self CPU time, the host syncs it makes). A diagnosis tool, not a benchmark of
record: bench_hf_experts.py is that.
Usage: python3 -m perf.profile_experts [--tokens 4096] [--experts 128 --hidden 2048 --inter 768] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from dwdp_comm import moe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--pieces", type=int, default=4)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    dev, bf = torch.device("cuda"), torch.bfloat16
    E, H, I, T, k = a.experts, a.hidden, a.inter, a.tokens, a.top_k
    gu = torch.randn(E, 2 * I, H, device=dev, dtype=bf) * 0.02
    dn = torch.randn(E, H, I, device=dev, dtype=bf) * 0.02
    cuts = [round(i * E / a.pieces) for i in range(a.pieces + 1)]
    s_gu = [(c0, gu[c0:c1].clone()) for c0, c1 in zip(cuts[:-1], cuts[1:])]
    s_dn = [(c0, dn[c0:c1].clone()) for c0, c1 in zip(cuts[:-1], cuts[1:])]
    x = torch.randn(T, H, device=dev, dtype=bf)
    val, idx = torch.randn(T, E, device=dev).softmax(-1).topk(k, dim=-1)
    w = (val / val.sum(-1, keepdim=True)).to(bf)
    variants = {"whole": lambda: moe.experts_forward(x, idx, w, gu, dn),
                "split": lambda: moe.experts_forward(x, idx, w, s_gu, s_dn),
                "split_moe_mlp": lambda: moe.experts_forward(x, idx, w, s_gu, s_dn, split_path="moe_mlp")}
    lines = [f"# profile_experts E={E} H={H} I={I} T={T} k={k} pieces={a.pieces} gpu={torch.cuda.get_device_name()}"]
    for name, fn in variants.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.calls):
            fn()
        host = (time.perf_counter() - t0) / a.calls
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / a.calls
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(a.calls):
            fn()
        e1.record()
        e1.synchronize()
        info: dict = {}
        moe.experts_forward(x, idx, w, *(([gu, dn]) if name == "whole" else [s_gu, s_dn]), info=info,
                            split_path="moe_mlp" if name == "split_moe_mlp" else "per_piece")
        lines.append(f"{name:13s} host {host * 1e3:7.3f} ms/call (launch)  wall {wall * 1e3:7.3f} ms/call  "
                     f"gpu {e0.elapsed_time(e1) / a.calls:7.3f} ms/call  info={info}")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            variants["split"]()
        torch.cuda.synchronize()
    lines.append("# split, 10 calls: top ops by self CPU time")
    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    lines.append("# split, 10 calls: top ops by CUDA time")
    lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    text = "\n".join(lines)
    print(text)
    out = a.out or (os.path.join(os.environ["OUT"], "profile_experts.txt") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
