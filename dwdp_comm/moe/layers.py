"""MoE layers on the library: DWDP (prefetched weights, no collective) and the DEP baseline.

Both share routing (:mod:`.routing`), the routed experts (:func:`dwdp_comm.moe.experts_forward`,
the function Hugging Face users get too, for every weight format) and the shared expert; they
differ only in where the routed experts' weights come from.

Expert weight formats (:func:`expert_weights`; the store names of each in :data:`EXPERT_NAMES`):

* ``bf16``: ``w13`` ``[E, H, 2I]`` (gate columns first, then up) and ``w2`` ``[E, I, H]``
  (``weight_layout="kn"``).
* ``fp8``: ``w13`` stored ``[E, 2I, H]`` and ``w2`` ``[E, H, I]`` in float8_e4m3fn, with float32
  per-output-channel scales ``w13_scale`` ``[E, 2I]`` and ``w2_scale`` ``[E, H]`` (weight format
  ``fp8_channel``). fp8 halves what DWDP must prefetch.
* ``fp8_block``: the same fp8 storage with DeepSeek-V3's 128 x 128 block scales ``w13_scale``
  ``[E, 2I/128, H/128]`` and ``w2_scale`` ``[E, H/128, I/128]`` (float32, Hugging Face's
  ``weight_scale_inv``): the format of the real checkpoints. The scales are prefetched with their
  weights (their own store names).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import kernels
from ..errors import bad_arg
from ..kernels import quant, quant_gemm
from ..layout import ExpertLayout
from .deepseek import DeepseekConfig, seeded_weight
from .experts import experts_forward
from .experts_reference import experts_forward_reference
from .pipeline import DwdpPipeline
from .routing import route_deepseek
from .tokens import combine_rows, gather_tokens, sort_by_expert

__all__ = ["expert_weights", "EXPERT_NAMES", "WEIGHT_FORMAT", "DwdpPipeline", "DwdpMoE", "DepMoE",
           "shared_expert_weights", "router_weights", "reference_moe", "route_tokens", "shared_expert", "kernel_args",
           "expert_args", "routed_experts"]

EXPERT_NAMES = {"bf16": ("w13", "w2"), "fp8": ("w13", "w2", "w13_scale", "w2_scale"),
                "fp8_block": ("w13", "w2", "w13_scale", "w2_scale")}
#: The weight format (:mod:`dwdp_comm.kernels.quant`) of each format of :func:`expert_weights`.
WEIGHT_FORMAT = {"bf16": "bf16", "fp8": "fp8_channel", "fp8_block": "fp8_block"}


def expert_weights(cfg: DeepseekConfig, seed: int, layer: int, experts: Sequence[int], *, fmt: str = "bf16",
                   device="cpu") -> dict[str, torch.Tensor]:
    """Seeded routed-expert weights of ``experts`` (stacked in the given order).

    Returns a dict name -> tensor with a leading ``len(experts)`` dimension (formats above).
    fp8 weights are the bf16 weights quantized per output channel (``fp8``) or per 128 x 128
    block (``fp8_block``) by :func:`dwdp_comm.kernels.quant.quantize`.
    """
    if fmt not in EXPERT_NAMES:
        raise bad_arg("fmt", fmt, f"one of {list(EXPERT_NAMES)}")
    h, i = cfg.hidden, cfg.moe_intermediate
    w13 = [seeded_weight(seed, layer, "w13", (h, 2 * i), fan_in=h, device=device, expert=e) for e in experts]
    w2 = [seeded_weight(seed, layer, "w2", (i, h), fan_in=i, device=device, expert=e) for e in experts]
    if fmt == "bf16":
        return {"w13": torch.stack(w13), "w2": torch.stack(w2)}
    out = {}
    for name, ws in (("w13", w13), ("w2", w2)):  # [K, N] -> [N, K] storage, quantized
        qs, scales = [], []
        for j in range(len(ws)):  # one expert at a time: a layer's float32 copy (30 GB at full size) need not fit
            q, scale = quant.quantize(ws[j].float().t().unsqueeze(0), WEIGHT_FORMAT[fmt])
            qs.append(q[0])
            scales.append(scale[0])
            ws[j] = None
        out[name], out[name + "_scale"] = torch.stack(qs), torch.stack(scales)
    return out


def expert_args(weights: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Keyword arguments of :func:`dwdp_comm.moe.experts_forward` for :func:`expert_weights` in ``fmt``
    (whole tensors, or a prefetch handle's views by the same names)."""
    if fmt == "bf16":
        return {"gate_up": weights["w13"], "down": weights["w2"], "weight_layout": "kn"}
    return {"gate_up": weights["w13"], "down": weights["w2"], "gate_up_scale": weights["w13_scale"],
            "down_scale": weights["w2_scale"], "weight_format": WEIGHT_FORMAT[fmt], "weight_layout": "nk"}


def kernel_args(weights: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Arguments of :func:`kernels.moe_mlp` for weights in format ``fmt`` (``[E, N, K]`` storage of
    the quantized formats passed transposed)."""
    if fmt == "bf16":
        return {"w13": weights["w13"], "w2": weights["w2"]}
    return {"w13": weights["w13"].transpose(-1, -2), "w2": weights["w2"].transpose(-1, -2),
            "w13_scales": weights["w13_scale"], "w2_scales": weights["w2_scale"], "weight_format": WEIGHT_FORMAT[fmt]}


def routed_experts(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, weights: dict[str, Any], fmt: str,
                   backend: str = "auto") -> torch.Tensor:
    """The routed experts of one DeepSeek block: :func:`dwdp_comm.moe.experts_forward` on
    :func:`expert_weights`-shaped ``weights`` (``[T, H]`` in x's dtype, weighted and summed)."""
    return experts_forward(x, ids, wts, backend=backend, **expert_args(weights, fmt))


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
    fmt : {"bf16", "fp8", "fp8_block"}
        Format of the stored expert weights (:data:`EXPERT_NAMES`).
    kernel_backend : str
        Passed to :func:`dwdp_comm.moe.experts_forward` as ``backend``.
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
        shared = shared_expert(x, self.shared)  # runs while the prefetch may still be in flight
        h = self.pipeline.acquire(self.layer, expert_ids=ids)
        y = routed_experts(x, ids, wts, {n: h.weights(n) for n in EXPERT_NAMES[self.fmt]}, self.fmt,
                           self.kernel_backend)
        self.pipeline.release(h)
        return y + shared


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
        order = sort_by_expert(ids, cfg.num_experts)
        xs, m_sizes = gather_tokens(x, order), order.m_sizes()
        # Rows per (destination rank, local expert of it), sent so receivers know each row's expert.
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
        # x_recv is ordered by (source rank, local expert): each row is one routed copy of its local
        # expert, weight 1 (the routing weights are applied at the combine, on the token's rank).
        nl = lay.num_local_experts
        local_ids = torch.arange(nl, device=x.device).repeat(g).repeat_interleave(
            recv_per_expert[:, :nl].reshape(-1))
        y_recv = experts_forward(x_recv, local_ids[:, None], torch.ones(local_ids.shape[0], 1, device=x.device),
                                 backend=self.kernel_backend, **expert_args(self.local, self.fmt))
        y_sorted = xs.new_empty(xs.shape[0], y_recv.shape[1])
        dist.all_to_all_single(y_sorted, y_recv, send_split, recv_split, group=self.group)
        return combine_rows(y_sorted, order, wts, out_dtype=x.dtype) + shared_expert(x, self.shared)


def reference_moe(cfg: DeepseekConfig, x: torch.Tensor, router: dict, shared: dict, experts: dict,
                  fmt: str = "bf16", quantize_activations: bool | None = None) -> torch.Tensor:
    """Oracle: the same block with all experts' weights in one place and the per-expert reference.

    ``quantize_activations`` (fp8 formats): the reference quantizes each GEMM's input as the fast
    path's fp8 kernels do; None: where those kernels run for ``x`` (CUDA), so the check compares
    like with like (on CPU the fast path dequantizes the weights and keeps bf16 activations)."""
    if quantize_activations is None:
        wf = WEIGHT_FORMAT[fmt]
        quantize_activations = x.is_cuda and wf != "bf16" and quant_gemm.native_unavailable_reason(wf, x.device) is None
    ids, wts = route_tokens(cfg, x, router)
    y = experts_forward_reference(x, ids, wts, quantize_activations=quantize_activations, **expert_args(experts, fmt))
    return y + shared_expert(x, shared)
