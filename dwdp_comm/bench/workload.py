"""The workload of the grouped-GEMM benchmarks: DeepSeek-V3 expert shapes and uneven top-k routing.

Shared by ``perf/bench_grouped_gemm.py`` and ``perf/probe_split_gemm.py`` so that both measure
the same problems (host-only; no device work).
"""

from __future__ import annotations

import torch

__all__ = ["DEEPSEEK_V3_SHAPES", "routed_counts"]

#: ``(K, N)`` of one routed expert's GEMMs in DeepSeek-V3: gate-up ``[7168, 2 * 2048]``, down ``[2048, 7168]``.
DEEPSEEK_V3_SHAPES = {"gate_up": (7168, 4096), "down": (2048, 7168)}


def routed_counts(num_tokens: int, num_experts: int, top_k: int, seed: int) -> tuple[list[int], dict]:
    """Per-expert row counts of ``num_tokens`` tokens routed top-k, unevenly as real routers do.

    Expert popularity is lognormal (sigma 0.5); each token picks its ``top_k`` distinct experts
    by Gumbel top-k over the log popularity. Deterministic in ``seed`` (CPU generator, in chunks
    of 16384 tokens). Returns the ``[num_experts]`` counts (summing to ``num_tokens * top_k``)
    and their ``rows``, ``mean``, ``max_over_mean``, ``min_over_mean``, ``cv`` and ``empty``.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    pop = torch.exp(0.5 * torch.randn(num_experts, generator=g))  # expert popularity, sigma 0.5
    counts = torch.zeros(num_experts, dtype=torch.int64)
    chunk = 16384
    for s in range(0, num_tokens, chunk):
        n = min(chunk, num_tokens - s)
        u = torch.rand(n, num_experts, generator=g).clamp_(1e-9, 1 - 1e-9)
        ids = (pop.log()[None, :] - torch.log(-torch.log(u))).topk(top_k, dim=1).indices
        counts += torch.bincount(ids.flatten(), minlength=num_experts)
    c = counts.numpy()
    stats = dict(rows=int(c.sum()), mean=float(c.mean()), max_over_mean=float(c.max() / c.mean()),
                 min_over_mean=float(c.min() / c.mean()), cv=float(c.std() / c.mean()), empty=int((c == 0).sum()))
    return c.tolist(), stats
