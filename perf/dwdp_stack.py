"""A rank's DWDP stack of DeepSeek-V3-like MoE blocks, as the perf scripts that time one build it.

:func:`config` picks the model shape (``--smoke``: :data:`dwdp_comm.moe.TOY`; else DeepSeek-V3 with
``--experts`` experts), :func:`build` registers each layer's local experts in a
:class:`~dwdp_comm.WeightStore`, and returns the prefetcher, the pipeline and the blocks with a
``forward`` that runs them all (``x + block(x)`` per layer, one ``pipe.begin()`` a forward).
Collective (every rank, same arguments): the store's commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import dwdp_comm as dc
from dwdp_comm import moe


def config(smoke: bool, experts: int) -> moe.DeepseekConfig:
    """The model of a run: :data:`dwdp_comm.moe.TOY` for a smoke run, else DeepSeek-V3's shape with
    ``experts`` routed experts (8 routing groups where they divide evenly)."""
    if smoke:
        return moe.TOY
    groups = 8 if experts % 8 == 0 else 1
    return moe.DEEPSEEK_V3.scaled(num_experts=experts, num_groups=groups, topk_groups=min(4, groups))


@dataclass
class Stack:
    """What :func:`build` returns (the caller closes the pipeline, prefetcher and store)."""

    store: dc.WeightStore
    prefetcher: dc.Prefetcher
    pipe: moe.DwdpPipeline
    blocks: list
    forward: Callable[[torch.Tensor], torch.Tensor]


def build(group, cfg: moe.DeepseekConfig, layers: list[int], seed: int, depth: int,
          chunk_nbytes: int = 8 << 20) -> Stack:
    """Register ``layers``' local experts (seeded random weights), commit the store (collective),
    and build the prefetcher (``depth`` layers ahead, ``chunk_nbytes`` chunks), pipeline and blocks."""
    dev = group.device
    lay = dc.ExpertLayout(cfg.num_experts, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    for layer in layers:
        for name, t in moe.expert_weights(cfg, seed, layer, lay.local_experts, device=dev).items():
            st.register(layer, name, t)
    st.commit()
    pf = dc.Prefetcher(st, depth=depth, chunk_nbytes=chunk_nbytes)
    pipe = moe.DwdpPipeline(pf, layers)
    blocks = [moe.DwdpMoE(cfg, layer, moe.router_weights(cfg, seed, layer, device=dev),
                          moe.shared_expert_weights(cfg, seed, layer, device=dev), pipe) for layer in layers]

    def forward(x: torch.Tensor) -> torch.Tensor:
        pipe.begin()
        for b in blocks:
            x = x + b(x)
        return x
    return Stack(st, pf, pipe, blocks, forward)
