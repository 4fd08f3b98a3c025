"""The oracle of :func:`dwdp_comm.moe.experts_forward`: a per-expert loop, any device, any format, slow."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import bad_arg
from ..kernels import quant
from ..kernels.moe_mlp import is_silu
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
    states' dtype (the weights cast to it). Quantized weights: dequantized to bf16 one expert at a
    time (:func:`dwdp_comm.kernels.quant.dequantize`), then the same loop in bf16 (the hidden
    states cast), as the fast path's numerics class.
    ``quantize_activations`` (fp8 formats): the fp8 kernels' numerics instead: both GEMMs' inputs
    go through the activation quantization the kernels apply (per row for ``fp8_channel``, per row
    and ``bk`` columns for ``fp8_block``), the GEMMs run in float32 on the dequantized values with
    bf16 results, and the routing weight is folded into the down GEMM's input (no down bias), as
    the fast path does; so a comparison isolates the kernels from that rounding.
    Returns ``[T, H]`` in the hidden states' dtype.
    """
    if weight_layout not in WEIGHT_LAYOUTS:
        raise bad_arg("weight_layout", repr(weight_layout), f"one of {WEIGHT_LAYOUTS}")
    act_fn = F.silu if act_fn is None else act_fn
    p13, p2 = Projection.pair(gate_up, gate_up_scale, down, down_scale, fmt=weight_format, block_size=block_size,
                              layout=weight_layout)
    fmt0 = p13.fmt
    quantized = fmt0 != "bf16"
    fq = quantize_activations and fmt0 in ("fp8_channel", "fp8_block")
    b1, b2 = bias_table(gate_up_bias, "gate_up_bias"), bias_table(down_bias, "down_bias")
    # quantized: bf16 numerics (the fast path's class); with fq, float32 GEMMs on the fp8-rounded
    # inputs with bf16 outputs, as the fp8 kernels (exact products, float32 sums, bf16 out)
    cdt = (torch.float32 if fq else torch.bfloat16) if quantized else hidden_states.dtype
    w1, w2 = _expert_weights(p13, cdt), _expert_weights(p2, cdt)
    fold = fq and b2 is None  # the fast path folds the routing weight into the down GEMM's input
    t = top_k_index.shape[0]
    out = torch.zeros(t, hidden_states.shape[1], dtype=torch.float32, device=hidden_states.device)
    for e in range(p13.num_experts):
        tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        rw = top_k_weights[tok, slot].unsqueeze(1)
        x = hidden_states[tok].to(cdt)
        if fq:
            x = _fake_quant(x.to(torch.bfloat16).float(), fmt0, p13.block_size)
        a = w1(e)
        h = x @ (a.transpose(0, 1) if weight_layout == "nk" else a).to(cdt)
        if fq:
            h = h.to(torch.bfloat16).to(cdt)
        if b1 is not None:
            h = h + b1[e].to(cdt)
        if gate in GATES and is_silu(act_fn):  # as the fast path: SwiGLU in float32, rounded once
            g = apply_gate(h.float(), gate, act_fn)
            h = (g * rw.float() if fold else g).to(torch.bfloat16 if fq else h.dtype)
        else:
            h = apply_gate(h, gate, act_fn)
            if fold:
                h = (h.float() * rw.float()).to(torch.bfloat16)
        if fq:
            h = _fake_quant(h.to(torch.bfloat16).float(), fmt0, p13.block_size)
        d = w2(e)
        y = h @ (d.transpose(0, 1) if weight_layout == "nk" else d).to(h.dtype)
        if fq:
            y = y.to(torch.bfloat16).float()
        if b2 is not None:
            y = y + b2[e].to(y.dtype)
        out.index_add_(0, tok, (y if fold else y * rw.to(y.dtype)).float())
    return out.to(hidden_states.dtype)


def _expert_weights(p: Projection, dtype: torch.dtype):
    """``get(e)``: expert ``e``'s weights as stored (``[N, K]`` / ``[K, N]``), quantized ones
    dequantized to ``dtype`` one expert at a time (no whole-tensor copy)."""
    index = [(pi, e - first) for pi, (first, t) in enumerate(p.pieces) for e in range(first, first + int(t.shape[0]))]

    def get(e: int) -> torch.Tensor:
        pi, i = index[e]
        w = p.pieces[pi][1][i]
        if p.fmt == "bf16":
            return w
        return quant.dequantize(w, p.scales[pi][i], p.fmt, block_size=p.block_size, dtype=dtype)
    return get
