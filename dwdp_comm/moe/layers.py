"""MoE layers on the library: DWDP (prefetched weights, no collective) and the DEP baseline.

Both share routing (:mod:`.routing`), the expert MLP (:func:`dwdp_comm.kernels.moe_mlp`) and the
shared expert; they differ only in where the routed experts' weights come from.

Expert weight formats (``ExpertWeights``):

* ``bf16``: ``w13`` ``[E, H, 2I]`` (gate columns first, then up) and ``w2`` ``[E, I, H]``.
* ``fp8``: ``w13`` stored ``[E, 2I, H]`` and ``w2`` ``[E, H, I]`` in float8_e4m3fn, with float32
  per-output-channel scales ``w13_scale`` ``[E, 2I]`` and ``w2_scale`` ``[E, H]``; the kernels get
  ``w.transpose(-1, -2)`` (the layout ``torch._scaled_grouped_mm`` needs). fp8 halves what DWDP
  must prefetch.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import kernels
from ..errors import bad_arg
from ..layout import ExpertLayout
from .pipeline import DwdpPipeline
from .deepseek import DeepseekConfig, seeded_weight
from .routing import permute_tokens, route_deepseek, unpermute_tokens

__all__ = ["expert_weights", "EXPERT_NAMES", "DwdpPipeline", "DwdpMoE", "DepMoE", "shared_expert_weights",
           "router_weights", "reference_moe", "route_tokens", "shared_expert", "kernel_args"]

EXPERT_NAMES = {"bf16": ("w13", "w2"), "fp8": ("w13", "w2", "w13_scale", "w2_scale")}
_FP8_MAX = 448.0


def expert_weights(cfg: DeepseekConfig, seed: int, layer: int, experts: Sequence[int], *, fmt: str = "bf16",
                   device="cpu") -> dict[str, torch.Tensor]:
    """Seeded routed-expert weights of ``experts`` (stacked in the given order).

    Returns a dict name -> tensor with a leading ``len(experts)`` dimension (formats above).
    fp8 weights are the bf16 weights quantized per output channel.
    """
    if fmt not in EXPERT_NAMES:
        raise bad_arg("fmt", fmt, f"one of {list(EXPERT_NAMES)}")
    h, i = cfg.hidden, cfg.moe_intermediate
    w13 = [seeded_weight(seed, layer, "w13", (h, 2 * i), fan_in=h, device=device, expert=e) for e in experts]
    w2 = [seeded_weight(seed, layer, "w2", (i, h), fan_in=i, device=device, expert=e) for e in experts]
    if fmt == "bf16":
        return {"w13": torch.stack(w13), "w2": torch.stack(w2)}
    out: dict[str, list] = {"w13": [], "w2": [], "w13_scale": [], "w2_scale": []}
    for name, ws in (("w13", w13), ("w2", w2)):
        for w in ws:  # [K, N] -> fp8 [N, K] with a scale per output channel n
            wt = w.float().t()
            scale = (wt.abs().amax(dim=1) / _FP8_MAX).clamp_min(1e-12)
            out[name].append((wt / scale[:, None]).to(torch.float8_e4m3fn))
            out[name + "_scale"].append(scale)
    return {k: torch.stack(v) for k, v in out.items()}


def kernel_args(weights: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Arguments of :func:`kernels.moe_mlp` for weights in format ``fmt``."""
    if fmt == "bf16":
        return {"w13": weights["w13"], "w2": weights["w2"]}
    return {"w13": weights["w13"].transpose(-1, -2), "w2": weights["w2"].transpose(-1, -2),
            "w13_scales": weights["w13_scale"], "w2_scales": weights["w2_scale"]}


def router_weights(cfg: DeepseekConfig, seed: int, layer: int, device="cpu") -> dict[str, torch.Tensor]:
    """Router matrix ``[E, H]`` (float32) and score-correction bias ``[E]``."""
    return {"gate": seeded_weight(seed, layer, "gate", (cfg.num_experts, cfg.hidden), fan_in=cfg.hidden,
                                  device=device, dtype=torch.float32),
            "bias": seeded_weight(seed, layer, "gate_bias", (cfg.num_experts,), fan_in=100, device=device,
                                  dtype=torch.float32)}


def shared_expert_weights(cfg: DeepseekConfig, seed: int, layer: int, device="cpu",
                          dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Shared expert: ``w13`` ``[H, 2 * S]`` and ``w2`` ``[S, H]``, S = intermediate x shared count."""
    h, s = cfg.hidden, cfg.moe_intermediate * cfg.num_shared_experts
    return {"w13": seeded_weight(seed, layer, "shared_w13", (h, 2 * s), fan_in=h, device=device, dtype=dtype),
            "w2": seeded_weight(seed, layer, "shared_w2", (s, h), fan_in=s, device=device, dtype=dtype)}


def shared_expert(x: torch.Tensor, w: dict) -> torch.Tensor:
    """The shared expert's SwiGLU MLP: ``x`` ``[T, H]`` with :func:`shared_expert_weights` ``w`` ->
    ``[T, H]`` (x's dtype)."""
    return kernels.swiglu(x @ w["w13"]) @ w["w2"]


def route_tokens(cfg: DeepseekConfig, x: torch.Tensor, router: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing of ``x`` ``[T, H]`` with :func:`router_weights` ``router``: float32
    logits, then :func:`~.routing.route_deepseek`. Returns (expert ids ``[T, top_k]``, weights
    ``[T, top_k]``)."""
    logits = F.linear(x.float(), router["gate"])
    return route_deepseek(logits, router["bias"], top_k=cfg.top_k, num_groups=cfg.num_groups,
                          topk_groups=cfg.topk_groups, routed_scaling=cfg.routed_scaling)


class DwdpMoE(torch.nn.Module):
    """DeepSeek-V3 MoE block whose routed experts come from a :class:`DwdpPipeline`. No collective.

    Parameters
    ----------
    cfg : DeepseekConfig
    layer : int
        The store layer holding this block's routed experts.
    router, shared : dict
        From :func:`router_weights` and :func:`shared_expert_weights` (replicated).
    pipeline : DwdpPipeline
    fmt : {"bf16", "fp8"}
        Format of the stored expert weights.
    kernel_backend : str
        Passed to :func:`dwdp_comm.kernels.moe_mlp`.
    """

    def __init__(self, cfg: DeepseekConfig, layer: int, router: dict, shared: dict, pipeline: DwdpPipeline,
                 fmt: str = "bf16", kernel_backend: str = "auto"):
        super().__init__()
        self.cfg, self.layer, self.router, self.shared = cfg, layer, router, shared
        self.pipeline, self.fmt, self.kernel_backend = pipeline, fmt, kernel_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[num_tokens, hidden]`` (normed) -> ``[num_tokens, hidden]``, same dtype."""
        cfg = self.cfg
        ids, wts = route_tokens(cfg, x, self.router)
        xs, m_sizes, order = permute_tokens(x, ids, cfg.num_experts)
        # Under CUDA graph capture no host sync may run: trust the device counts (permute_tokens made them).
        groups = kernels.TokenGroups(m_sizes, validate=not (x.is_cuda and torch.cuda.is_current_stream_capturing()))
        shared = shared_expert(x, self.shared)  # runs while the prefetch may still be in flight
        h = self.pipeline.acquire(self.layer, expert_ids=ids)
        w = {n: h.weights(n) for n in EXPERT_NAMES[self.fmt]}
        y = kernels.moe_mlp(xs, groups, backend=self.kernel_backend, **kernel_args(w, self.fmt))
        self.pipeline.release(h)
        return unpermute_tokens(y, order, wts) + shared


class DepMoE(torch.nn.Module):
    """The DEP baseline: experts sharded by :class:`ExpertLayout`, tokens moved by all-to-all.

    Dispatch sends each routed token copy to the rank owning its expert
    (``all_to_all_single`` over ``group``, NCCL on GPUs), the owner runs its local experts with
    the same grouped GEMM, and combine sends the results back. Every rank must call ``forward``
    for every layer (collective).

    Parameters
    ----------
    cfg : DeepseekConfig
    layout : ExpertLayout
    router, shared : dict
    local : dict
        This rank's expert weights (:func:`expert_weights` of ``layout.local_experts``).
    group : torch.distributed.ProcessGroup, optional
    fmt, kernel_backend : str
    """

    def __init__(self, cfg: DeepseekConfig, layout: ExpertLayout, router: dict, shared: dict, local: dict,
                 group=None, fmt: str = "bf16", kernel_backend: str = "auto"):
        super().__init__()
        self.cfg, self.layout, self.router, self.shared, self.local = cfg, layout, router, shared, local
        self.group, self.fmt, self.kernel_backend = group, fmt, kernel_backend
        self._bounds = [layout.first_expert(r) for r in range(layout.group_size)] + [cfg.num_experts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[num_tokens, hidden]`` (normed) -> same shape. Collective (all-to-all)."""
        cfg, lay, g = self.cfg, self.layout, self.layout.group_size
        ids, wts = route_tokens(cfg, x, self.router)
        xs, m_sizes, order = permute_tokens(x, ids, cfg.num_experts)
        # Rows per (destination rank, local expert of it), sent so receivers can regroup.
        send_counts = torch.stack([m_sizes[self._bounds[r]:self._bounds[r + 1]].sum() for r in range(g)])
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        per_expert = m_sizes.new_zeros(g, lay.max_local_experts)
        for r in range(g):
            n = self._bounds[r + 1] - self._bounds[r]
            per_expert[r, :n] = m_sizes[self._bounds[r]:self._bounds[r + 1]]
        recv_per_expert = torch.empty_like(per_expert)
        dist.all_to_all_single(recv_per_expert, per_expert, group=self.group)
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()  # host sync, as DEP needs
        x_recv = xs.new_empty(sum(recv_split), xs.shape[1])
        dist.all_to_all_single(x_recv, xs, recv_split, send_split, group=self.group)
        # x_recv is ordered by (source rank, local expert): regroup by local expert.
        nl = lay.num_local_experts
        counts = recv_per_expert[:, :nl]  # [G, nl]
        src_expert = torch.arange(nl, device=x.device).repeat(g).repeat_interleave(counts.reshape(-1))
        regroup = torch.sort(src_expert, stable=True).indices
        y_local = kernels.moe_mlp(x_recv[regroup], kernels.TokenGroups(counts.sum(0)), backend=self.kernel_backend,
                                  **kernel_args(self.local, self.fmt))
        y_recv = torch.empty_like(y_local)
        y_recv[regroup] = y_local
        y_sorted = xs.new_empty(xs.shape[0], y_recv.shape[1])
        dist.all_to_all_single(y_sorted, y_recv, send_split, recv_split, group=self.group)
        return unpermute_tokens(y_sorted, order, wts) + shared_expert(x, self.shared)


def reference_moe(cfg: DeepseekConfig, x: torch.Tensor, router: dict, shared: dict, experts: dict,
                  fmt: str = "bf16") -> torch.Tensor:
    """Oracle: the same block with all experts' weights in one place and the reference kernel."""
    ids, wts = route_tokens(cfg, x, router)
    xs, m_sizes, order = permute_tokens(x, ids, cfg.num_experts)
    y = kernels.moe_mlp(xs, m_sizes, backend="reference", **kernel_args(experts, fmt))
    return unpermute_tokens(y, order, wts) + shared_expert(x, shared)
