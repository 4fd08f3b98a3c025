"""Routed-experts forward with Hugging Face transformers' experts semantics, over local or split weights.

This is the contract the transformers integration (:mod:`dwdp_comm.integrations.transformers`)
calls for every experts module whose math it covers. It takes routing already done (top-k ids and
weights per token), and weights either whole (``[E, ...]``, contiguous or a composite view) or
split into per-owner pieces (:meth:`dwdp_comm.PrefetchHandle.weight_segments`).

The body here is the plain per-expert reference; a faster path may replace it as long as it is
tested against :func:`experts_forward_reference` on fresh random data.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import bad_arg, bad_type

__all__ = ["experts_forward", "experts_forward_reference", "GATES", "WEIGHT_LAYOUTS"]

GATES = ("swiglu", "swiglu_interleaved")
WEIGHT_LAYOUTS = ("nk", "kn")


def _expert_getter(w: Any, arg: str) -> tuple[Callable[[int], torch.Tensor], int]:
    """``(get(e) -> tensor of expert e, num_experts)`` for a whole tensor or a list of pieces."""
    if isinstance(w, torch.Tensor):
        return (lambda e: w[e]), w.shape[0]
    if isinstance(w, (list, tuple)) and w:
        pieces = []
        nxt = 0
        for item in w:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
                first, t = item
                if first != nxt:
                    raise bad_arg(arg, f"a piece starting at expert {first}", f"pieces in expert order from {nxt}")
            elif isinstance(item, torch.Tensor):
                t = item
            else:
                raise bad_type(arg, item, "torch.Tensor or (first_expert, torch.Tensor)")
            pieces.append((nxt, t))
            nxt += t.shape[0]
        index = [(p, e - first) for first, p in pieces for e in range(first, first + p.shape[0])]
        return (lambda e: index[e][0][index[e][1]]), nxt
    raise bad_type(arg, w, "a [num_experts, ...] torch.Tensor or a list of (first_expert, tensor) pieces")


def _apply_gate(h: torch.Tensor, gate: Any, act_fn: Callable) -> torch.Tensor:
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


def experts_forward_reference(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                              gate_up: Any, down: Any, *, gate_up_bias: Any = None, down_bias: Any = None,
                              weight_layout: str = "nk", gate: Any = "swiglu",
                              act_fn: Callable | None = None) -> torch.Tensor:
    """Per-expert loop with the semantics of :func:`experts_forward` (the oracle; any device, slow)."""
    if weight_layout not in WEIGHT_LAYOUTS:
        raise bad_arg("weight_layout", repr(weight_layout), f"one of {WEIGHT_LAYOUTS}")
    act_fn = F.silu if act_fn is None else act_fn
    w1, num_experts = _expert_getter(gate_up, "gate_up")
    w2, num_down = _expert_getter(down, "down")
    if num_down != num_experts:
        raise bad_arg("down", f"{num_down} experts", f"{num_experts} experts, as gate_up")
    b1 = _expert_getter(gate_up_bias, "gate_up_bias")[0] if gate_up_bias is not None else None
    b2 = _expert_getter(down_bias, "down_bias")[0] if down_bias is not None else None
    t, k = top_k_index.shape
    out = torch.zeros(t, hidden_states.shape[1], dtype=torch.float32, device=hidden_states.device)
    for e in range(num_experts):
        tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        x = hidden_states[tok]
        a = w1(e)
        h = x @ (a.transpose(0, 1) if weight_layout == "nk" else a).to(x.dtype)
        if b1 is not None:
            h = h + b1(e)
        h = _apply_gate(h, gate, act_fn)
        d = w2(e)
        y = h @ (d.transpose(0, 1) if weight_layout == "nk" else d).to(h.dtype)
        if b2 is not None:
            y = y + b2(e)
        out.index_add_(0, tok, (y * top_k_weights[tok, slot].unsqueeze(1).to(y.dtype)).float())
    return out.to(hidden_states.dtype)


def experts_forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    gate_up: Any, down: Any, *, gate_up_bias: Any = None, down_bias: Any = None,
                    weight_layout: str = "nk", gate: Any = "swiglu", act_fn: Callable | None = None,
                    info: dict | None = None) -> torch.Tensor:
    """Routed experts: ``sum_k w[t, k] * down(gate(gate_up(x[t])))`` over each token's top-k experts.

    Parameters
    ----------
    hidden_states : torch.Tensor
        ``[T, H]`` token activations (bf16, fp16 or float32).
    top_k_index : torch.Tensor
        ``[T, k]`` integer expert ids. Ids outside ``[0, E)`` (expert-parallel sentinels)
        contribute nothing.
    top_k_weights : torch.Tensor
        ``[T, k]`` combine weights.
    gate_up : torch.Tensor or list
        Per expert the gate-up projection (or the up projection when ``gate`` is None): ``[E, N, K]``
        with ``weight_layout="nk"`` (nn.Linear / HF default), ``[E, K, N]`` with ``"kn"``; or split
        pieces ``[(first_expert, tensor[count, ...]), ...]`` / a list of tensors in expert order.
    down : torch.Tensor or list
        The down projection, same forms.
    gate_up_bias, down_bias : torch.Tensor or list, optional
        ``[E, N]`` biases (or pieces).
    weight_layout : {"nk", "kn"}
    gate : {"swiglu", "swiglu_interleaved"}, callable or None
        ``"swiglu"``: ``act_fn(h[:, :I]) * h[:, I:]``; ``"swiglu_interleaved"``: gate columns even,
        up columns odd; a callable maps ``[S, N]`` to ``[S, I]``; None applies ``act_fn`` alone.
    act_fn : callable, optional
        Default ``torch.nn.functional.silu``.
    info : dict, optional
        Receives ``info["method"]``: what ran.

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in ``hidden_states``' dtype, on its device and current stream.
    """
    if info is not None:
        info["method"] = "reference"
    return experts_forward_reference(hidden_states, top_k_index, top_k_weights, gate_up, down,
                                     gate_up_bias=gate_up_bias, down_bias=down_bias, weight_layout=weight_layout,
                                     gate=gate, act_fn=act_fn)
