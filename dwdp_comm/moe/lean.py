"""The lean experts path: one weight tensor per projection, with as few host steps as the math needs.

At small token counts :func:`dwdp_comm.moe.experts_forward` is bound by the host, not the GPU
(``perf/results/bench_sizes_h100_before.json``: equal or better GPU time under CUDA graphs,
slower eager). Every torch op costs a few microseconds of host time; the general path dispatches
about 38 of them per call, and validates its arguments three times over (``experts_forward``,
``moe_mlp``, each ``grouped_gemm``). Here, for one weight tensor (contiguous or a composite
view), after :func:`~dwdp_comm.moe.experts_forward` validated the arguments once:

==============================  ==========================================================
step                            ops (CUDA, bf16 on sm90+, SwiGLU with SiLU, no biases)
==============================  ==========================================================
route (sort by expert, gather)  one Triton kernel (:mod:`dwdp_comm.kernels.triton_route`) on
                                small batches, a count, a ``cumsum`` and a placing kernel on
                                larger ones, up to its size bound
                                (:func:`~dwdp_comm.kernels.triton_route.fits`); past it, the ops of
                                :func:`~dwdp_comm.moe.tokens.sort_by_expert`
gate-up GEMM                    one ``torch._grouped_mm`` on the weights as stored
activation                      one Triton pass (gate, routing weight folded in)
down GEMM                       one ``torch._grouped_mm``
combine                         one Triton gather-sum reading the route's offsets
==============================  ==========================================================

Anything else (biases, other gates, float32 on CUDA, no Triton) keeps the fused route where it
runs and hands the MLP to :func:`dwdp_comm.kernels.moe_mlp` with device offsets, as the general
path does. Same results as the general path (the same kernels in the same order; tested against
:func:`~dwdp_comm.moe.experts_forward_reference` on fresh random data).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from .. import kernels
from ..kernels import triton_moe, triton_route
from ..kernels.capabilities import grouped_mm_supported, has_device_kernel, operand_ok
from ..errors import bad_arg
from ..kernels.moe_mlp import GATES, apply_gate, is_silu
from .tokens import TokenOrder, combine_rows, gather_tokens, sort_by_expert

__all__ = ["forward", "route_torch", "route_failures"]

log = logging.getLogger("dwdp_comm")

_INT_IDS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_WIDE_IDS = (torch.int64, torch.int32)  # what the fused route reads (its -1 fill is no valid id there)
_GROUPED: dict = {}  # (device, dtype) -> torch._grouped_mm has its own kernel there
#: device -> why the fused route kernel failed to build there (the torch ops run there from then on).
route_failures: dict = {}


def _grouped_ok(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device, dtype)
    ok = _GROUPED.get(key)
    if ok is None:  # probed once per device and dtype (a host wait, never under capture: see capabilities)
        ok = _GROUPED[key] = grouped_mm_supported(device, dtype) and has_device_kernel(device, dtype)
    return ok


def route_torch(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                num_experts: int) -> tuple[triton_route.Route, TokenOrder]:
    """The torch-ops route (the fused route's reference): ``(Route, TokenOrder)``.

    ``Route.src`` holds the sorted rows times ``H`` (element offsets into a contiguous ``[S, H]``
    result), ``-1`` for sentinels, as :func:`dwdp_comm.kernels.triton_route.route` returns it.
    """
    order = sort_by_expert(top_k_index, num_experts)
    rows = gather_tokens(x, order)
    hidden = int(x.shape[1])
    src = torch.where(order.slot_rows >= 0, order.slot_rows * hidden, -1)
    return triton_route.Route(rows, order.offsets, src, top_k_weights.reshape(-1)[order.order]), order


def _route(x, top_k_index, top_k_weights, num_experts):
    """``(Route, TokenOrder or None, how)``: the fused kernel where it runs, else the torch ops."""
    s = int(top_k_index.shape[0]) * int(top_k_index.shape[1])
    dev = x.device
    if dev not in route_failures and top_k_index.dtype in _WIDE_IDS and \
            triton_route.unavailable_reason(x, s, num_experts) is None:
        try:
            return triton_route.route(x, top_k_index, top_k_weights, num_experts), None, "triton"
        except Exception as exc:  # a Triton build failure on first use: run the torch ops from now on
            if type(exc).__module__.split(".")[0] != "triton":  # compile / resource errors only
                raise
            route_failures[dev] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("dwdp_comm: the fused route kernel failed to build on %s, using torch ops: %s", dev,
                        route_failures[dev])
    r, order = route_torch(x, top_k_index, top_k_weights, num_experts)
    return r, order, "torch"


def _bias_ok(b: torch.Tensor | None, e: int, n: int, like: torch.Tensor) -> bool:
    """None, or an ``[E, N]`` floating-point tensor on ``like``'s device (else the general path reports it)."""
    return b is None or (isinstance(b, torch.Tensor) and b.is_floating_point() and tuple(b.shape) == (e, n)
                         and b.device == like.device)


def _mlp(r: triton_route.Route, w13k, w2k, b13, b2, gate, act_fn, e: int, inter: int, sub: dict) -> torch.Tensor:
    """Gate-up GEMM, activation (bias, gate, routing weight), down GEMM over one weight tensor each.

    The math of :func:`dwdp_comm.kernels.moe_mlp` on that case, in the same order: the routing
    weight folded into the activation when there is no down bias, else applied after it.
    """
    rows, dt = r.rows, r.rows.dtype
    h = torch._grouped_mm(rows, w13k, offs=r.offsets)
    s = int(h.shape[0])
    fold = b2 is None
    row_e = None
    if b13 is not None or b2 is not None:  # the expert of every sorted row (past the real rows: the last)
        row_e = torch.searchsorted(r.offsets, torch.arange(s, device=h.device, dtype=torch.int32), right=True)
        row_e = row_e.clamp_(max=e - 1)
    if gate in GATES and is_silu(act_fn) and triton_moe.unavailable_reason(h) is None and h.stride(-1) == 1:
        a = torch.empty(s, inter, dtype=dt, device=h.device)
        triton_moe.gated_activation(h, a, interleaved=gate == "swiglu_interleaved", limit=r.offsets[e - 1:],
                                    row_weights=r.row_weights if fold else None,
                                    bias=None if b13 is None else b13.contiguous(), row_experts=row_e)
        sub["activation"] = "triton"
    else:
        if b13 is not None:
            h = h + b13[row_e].to(h.dtype)
        a = apply_gate(h, gate, act_fn)
        if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.shape[0] != s:
            raise bad_arg("gate", f"a result of shape {tuple(a.shape) if isinstance(a, torch.Tensor) else a}",
                          f"[{s}, intermediate] for gate-up rows of shape {tuple(h.shape)}")
        if fold:
            w = r.row_weights.unsqueeze(1)
            a = a * (w.float() if a.dtype == torch.float32 else w.to(a.dtype))
        if a.dtype != dt:  # a callable gate may promote; the down GEMM takes the rows' dtype
            a = a.to(dt)
        sub["activation"] = "torch"
    y = torch._grouped_mm(a, w2k, offs=r.offsets)
    if b2 is not None:
        y.add_(b2[row_e].to(y.dtype))
        y.mul_(r.row_weights.unsqueeze(1))
    return y


def forward(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, w13: torch.Tensor,
            w2: torch.Tensor, *, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
            weight_layout: str, gate: Any, act_fn: Callable | None, out_dtype: torch.dtype,
            info: dict | None) -> torch.Tensor | None:
    """Routed experts over one weight tensor per projection, or None where this path does not apply.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` in the weights' dtype (bf16 or float32).
    top_k_index, top_k_weights : torch.Tensor
        ``[T, k]`` expert ids (sentinels outside ``[0, E)``) and routing weights.
    w13, w2 : torch.Tensor
        ``[E, N, H]`` / ``[E, H, I]`` (``weight_layout="nk"``) or ``[E, H, N]`` / ``[E, I, H]``
        (``"kn"``): one tensor each (contiguous or a composite view).
    gate_up_bias, down_bias : torch.Tensor, optional
        ``[E, N]`` / ``[E, H]``.
    weight_layout, gate, act_fn
        As :func:`dwdp_comm.moe.experts_forward`, which validated them.
    out_dtype : torch.dtype
        The result's dtype (the caller's ``hidden_states`` dtype).
    info : dict, optional
        Receives ``method="grouped"``, ``pieces=1``, ``path="lean"``, ``route``, ``activation``
        and ``combine`` (``"triton"`` or ``"torch"``).

    Returns
    -------
    torch.Tensor or None
        ``[T, H]`` in ``out_dtype``, enqueued on the current stream without host synchronisation
        on CUDA (bf16 on sm90+); None when the arguments do not fit this path (an integer dtype
        or shape it does not take): the caller's general path then runs and reports any error.
    """
    if top_k_index.dtype not in _INT_IDS or not top_k_weights.is_floating_point() or \
            w13.dim() != 3 or w2.dim() != 3:
        return None
    t, hidden = x.shape
    e = int(w13.shape[0])
    w13k = w13.transpose(1, 2) if weight_layout == "nk" else w13  # logical [E, H, N]
    w2k = w2.transpose(1, 2) if weight_layout == "nk" else w2  # logical [E, I, H]
    n, inter = int(w13k.shape[2]), int(w2k.shape[1])
    if int(w13k.shape[1]) != hidden or int(w2k.shape[2]) != hidden or int(w2.shape[0]) != e or \
            inter != (n if gate is None else n // 2) or (gate in GATES and n % 2):
        return None  # shapes the general path explains in its error
    if not (_bias_ok(gate_up_bias, e, n, x) and _bias_ok(down_bias, e, hidden, x)):
        return None
    r, order, how = _route(x, top_k_index, top_k_weights, e)
    dev, dt = x.device, x.dtype
    sub: dict = {}
    if _grouped_ok(dev, dt) and operand_ok(r.rows) and operand_ok(w13k) and operand_ok(w2k):
        y = _mlp(r, w13k, w2k, gate_up_bias, down_bias, gate, act_fn, e, inter, sub)
    else:  # per-expert GEMMs (float32 on CUDA, old GPUs) or strides torch._grouped_mm rejects
        groups = kernels.TokenGroups(r.offsets, offsets=True, validate=dev.type == "cpu")
        y = kernels.moe_mlp(r.rows, groups, w13, w2, w13_bias=gate_up_bias, w2_bias=down_bias,
                            row_weights=r.row_weights, ignore_tail=True, gate=gate, act_fn=act_fn,
                            weight_layout=weight_layout, info=sub)
    if triton_moe.unavailable_reason(y) is None and y.stride() == (hidden, 1):
        out = torch.empty(t, hidden, dtype=out_dtype, device=dev)
        res = triton_moe.combine(y, r.src, out)
        sub["combine"] = "triton"
    else:
        if order is None:  # fused route, no Triton combine (ENABLED switched off in between): rows from src
            order = TokenOrder(order=r.src.new_empty(0), expert_ids=r.offsets.new_empty(0), offsets=r.offsets,
                               slot_rows=torch.where(r.src >= 0, torch.div(r.src, hidden, rounding_mode="floor"), -1),
                               num_experts=e, top_k=int(top_k_index.shape[1]))
        res = combine_rows(y, order, out_dtype=out_dtype, info=sub)
    if info is not None:
        info.update(method="grouped", pieces=1, path="lean", route=how, activation=sub.get("activation"),
                    combine=sub.get("combine"))
    return res
