"""The oracle of :func:`dwdp_comm.moe.experts_forward`: a per-expert loop, any device, any format, slow."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import bad_arg
from ..kernels import quant
from ..kernels.reference import quantize_groupwise, quantize_rowwise
from .projections import Projection, bias_table

__all__ = ["experts_forward_reference", "apply_gate", "GATES", "WEIGHT_LAYOUTS"]

GATES = ("swiglu", "swiglu_interleaved")
WEIGHT_LAYOUTS = ("nk", "kn")


def apply_gate(h: torch.Tensor, gate: Any, act_fn: Callable) -> torch.Tensor:
    """The gate of :func:`~dwdp_comm.moe.experts_forward` on gate-up rows ``h`` ``[R, N]``."""
    if gate is None:
        return act_fn(h)
    if callable(gate):
        return gate(h)
    if gate == "swiglu":
        g, u = h.chunk(2, dim=-1)
        return act_fn(g) * u
    if gate == "swiglu_interleaved":
        return act_fn(h[..., 0::2]) * h[..., 1::2]
    raise bad_arg("gate", repr(gate), f"one of {GATES}, a callable, or None")


def _fake_quant(x: torch.Tensor, fmt: str, block_size: tuple) -> torch.Tensor:
    """``x`` (float32) through the fp8 activation quantization of ``fmt``'s fast path, dequantized."""
    if fmt == "fp8_channel":
        q, s = quantize_rowwise(x)
        return q.float() * s[:, None]
    q, s = quantize_groupwise(x, block_size[1])
    return q.float() * s.repeat_interleave(block_size[1], dim=1)[:, :x.shape[1]]


def experts_forward_reference(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                              gate_up: Any, down: Any, *, gate_up_scale: Any = None, down_scale: Any = None,
                              weight_format: str | None = None, block_size: Any = quant.DEFAULT_BLOCK_SIZE,
                              gate_up_bias: Any = None, down_bias: Any = None, weight_layout: str = "nk",
                              gate: Any = "swiglu", act_fn: Callable | None = None,
                              quantize_activations: bool = False) -> torch.Tensor:
    """Per-expert loop with the semantics of :func:`~dwdp_comm.moe.experts_forward` (the oracle).

    Arguments as :func:`~dwdp_comm.moe.experts_forward`. Plain weights: each GEMM in the hidden
    states' dtype (the weights cast to it). Quantized weights: dequantized
    (:func:`dwdp_comm.kernels.quant.dequantize`), every GEMM in float32 on float32 activations.
    ``quantize_activations`` (fp8 formats): both GEMMs' inputs go through the fp8 activation
    quantization the fast path's kernels apply (per row for ``fp8_channel``, per row and ``bk``
    columns for ``fp8_block``), so the comparison isolates the kernels from that rounding.
    Returns ``[T, H]`` in the hidden states' dtype.
    """
    if weight_layout not in WEIGHT_LAYOUTS:
        raise bad_arg("weight_layout", repr(weight_layout), f"one of {WEIGHT_LAYOUTS}")
    act_fn = F.silu if act_fn is None else act_fn
    p13 = Projection.build(gate_up, gate_up_scale, name="gate_up", scale_name="gate_up_scale", fmt=weight_format,
                           block_size=block_size, layout=weight_layout)
    p2 = Projection.build(down, down_scale, name="down", scale_name="down_scale", fmt=p13.fmt,
                          block_size=block_size, layout=weight_layout)
    if p2.num_experts != p13.num_experts:
        raise bad_arg("down", f"{p2.num_experts} experts", f"{p13.num_experts} experts, as gate_up")
    fmt0 = p13.fmt
    quantized = fmt0 != "bf16"
    if quantized:
        p13, p2 = p13.dequantized(torch.float32), p2.dequantized(torch.float32)
    fq = quantize_activations and fmt0 in ("fp8_channel", "fp8_block")
    b1, b2 = bias_table(gate_up_bias, "gate_up_bias"), bias_table(down_bias, "down_bias")
    w1, w2 = p13.pieces[0][1] if len(p13.pieces) == 1 else torch.cat([t for _, t in p13.pieces]), \
        p2.pieces[0][1] if len(p2.pieces) == 1 else torch.cat([t for _, t in p2.pieces])
    cdt = torch.float32 if quantized else hidden_states.dtype
    t = top_k_index.shape[0]
    out = torch.zeros(t, hidden_states.shape[1], dtype=torch.float32, device=hidden_states.device)
    for e in range(p13.num_experts):
        tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        x = hidden_states[tok].to(cdt)
        if fq:
            x = _fake_quant(x.float(), fmt0, p13.block_size)
        a = w1[e]
        h = x @ (a.transpose(0, 1) if weight_layout == "nk" else a).to(cdt)
        if b1 is not None:
            h = h + b1[e].to(cdt)
        h = apply_gate(h, gate, act_fn)
        if fq:
            h = _fake_quant(h.to(torch.bfloat16).float(), fmt0, p13.block_size)  # the kernels see bf16 rows
        d = w2[e]
        y = h @ (d.transpose(0, 1) if weight_layout == "nk" else d).to(h.dtype)
        if b2 is not None:
            y = y + b2[e].to(y.dtype)
        out.index_add_(0, tok, (y * top_k_weights[tok, slot].unsqueeze(1).to(y.dtype)).float())
    return out.to(hidden_states.dtype)

