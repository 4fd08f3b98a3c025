"""Routed-experts forward with Hugging Face transformers' experts semantics, over local or split weights.

This is the contract the transformers integration (:mod:`dwdp_comm.integrations.transformers`)
calls for every experts module whose math it covers. It takes routing already done (top-k ids and
weights per token), and weights either whole (``[E, ...]``, contiguous or a composite view) or
split into per-owner pieces (:meth:`dwdp_comm.PrefetchHandle.weight_segments`).

How the fast path works (what Hugging Face's ``grouped_mm`` path spends time on, and what is
done instead):

- routing prep on the device, no host sync: a stable sort of int32 keys, end offsets by binary
  search, the inverse permutation by one scatter (:func:`dwdp_comm.moe.tokens.sort_by_expert`);
- one gather of the token rows, one ``torch._grouped_mm`` per projection on the weights as
  stored (``[E, N, K]`` passed as a transposed view: no copy);
- gate, bias and routing weight in one pass (Triton on CUDA): the routing weight is folded into
  the activation before the down GEMM when there is no down bias (``down(a * w) = w * down(a)``),
  which saves the ``[S, H]`` multiply;
- no masking passes for sentinel ids: the activation skips rows past the last group (read on
  the device) and the combine skips sentinel slots;
- one fused gather-sum (float32 accumulation) instead of gather, multiply and sum passes.

Split weights (pieces): pieces that lie back to back in one storage (a composite handle's
segments) are one tensor again, as above. Truly separate pieces: the first piece (rows from 0) is
queued at once, then one host read of the row bounds (an asynchronous copy, awaited while the GPU
computes the first piece), then each other piece's gate-up, activation and down on its own rows,
pieces concurrently on worker streams, and the combine reading every piece's result in place. The reference :func:`experts_forward_reference` is the oracle of the tests.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import kernels
from ..errors import GraphCaptureError, bad_arg, bad_type
from ..kernels.workers import WorkerStreams
from . import lean
from .tokens import combine_rows, gather_tokens, sort_by_expert

__all__ = ["experts_forward", "experts_forward_reference", "GATES", "WEIGHT_LAYOUTS", "SPLIT_PATHS"]

GATES = ("swiglu", "swiglu_interleaved")
WEIGHT_LAYOUTS = ("nk", "kn")
SPLIT_PATHS = ("per_piece", "moe_mlp")


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


def _pieces(w: Any, arg: str) -> list[tuple[int, torch.Tensor]]:
    """Whole tensor or pieces as ``[(first_expert, tensor[count, ...]), ...]`` (views, no copy)."""
    if isinstance(w, torch.Tensor):
        if w.dim() != 3:
            raise bad_arg(arg, f"a tensor of shape {tuple(w.shape)}", "[num_experts, N, K] or [num_experts, K, N]")
        return [(0, w)]
    if isinstance(w, (str, bytes)) or not isinstance(w, (list, tuple)) or not w:
        raise bad_type(arg, w, "a [num_experts, ...] torch.Tensor or a list of (first_expert, tensor) pieces")
    out, nxt = [], 0
    for i, item in enumerate(w):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            first, t = item
            if int(first) != nxt:
                raise bad_arg(f"{arg}[{i}]", f"a piece starting at expert {first}", f"pieces in expert order from {nxt}")
        elif isinstance(item, torch.Tensor):
            t = item
        else:
            raise bad_type(f"{arg}[{i}]", item, "torch.Tensor or (first_expert, torch.Tensor)")
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3:
            raise bad_arg(f"{arg}[{i}]", f"shape {tuple(t.shape)}", "[count, N, K] / [count, K, N] (or one expert 2-D)")
        if t.shape[0]:
            out.append((nxt, t))
        nxt += int(t.shape[0])
    if not out:
        raise bad_arg(arg, "pieces holding 0 experts", "at least one expert")
    return out


def _coalesce(pieces: list[tuple[int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
    """Merge consecutive pieces that lie back to back in one storage into one view (no copy).

    A prefetch handle's :meth:`~dwdp_comm.PrefetchHandle.weight_segments` in composite mode are
    slices of one virtual range: seen as one tensor they take the grouped path, with no host sync.
    """
    out = [pieces[0]]
    for first, t in pieces[1:]:
        f0, t0 = out[-1]
        n0 = int(t0.shape[0])
        if (t.dtype == t0.dtype and t.device == t0.device and t.shape[1:] == t0.shape[1:]
                and t.stride() == t0.stride() and t.untyped_storage().data_ptr() == t0.untyped_storage().data_ptr()
                and t.data_ptr() == t0.data_ptr() + n0 * t0.stride(0) * t0.element_size()):
            out[-1] = (f0, t0.as_strided((n0 + int(t.shape[0]),) + tuple(t0.shape[1:]), t0.stride()))
        else:
            out.append((first, t))
    return out


def _cut(pieces: list, cuts: list[int]) -> list[tuple[int, torch.Tensor]]:
    """``pieces`` re-sliced at expert boundaries ``cuts`` (views)."""
    out = []
    for first, t in pieces:
        n = int(t.shape[0])
        inner = [c for c in cuts if first < c < first + n]
        for a, b in zip([first] + inner, inner + [first + n]):
            out.append((a, t[a - first:b - first]))
    return out


def _pieces_bias(b: Any) -> list[tuple[int, torch.Tensor]]:
    if isinstance(b, torch.Tensor):
        return [(0, b)]
    out, nxt = [], 0
    for item in b:
        t = item[1] if isinstance(item, tuple) else item
        t = t.unsqueeze(0) if t.dim() == 1 else t
        out.append((nxt, t))
        nxt += int(t.shape[0])
    return out


def _row_bounds(offsets: torch.Tensor) -> tuple[Callable[[], list[int]], Any]:
    """Start an asynchronous host copy of the end offsets; ``wait()`` returns them as a list."""
    if offsets.device.type != "cuda":
        return (lambda: offsets.tolist()), None
    host = torch.empty(offsets.shape, dtype=offsets.dtype, pin_memory=True)
    host.copy_(offsets, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()

    def wait():
        ev.synchronize()  # a host wait: only for split weights, after the gather is queued
        return host.tolist()
    return wait, ev


def experts_forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    gate_up: Any, down: Any, *, gate_up_bias: Any = None, down_bias: Any = None,
                    weight_layout: str = "nk", gate: Any = "swiglu", act_fn: Callable | None = None,
                    info: dict | None = None, backend: str = "auto", split_path: str = "per_piece") -> torch.Tensor:
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
        The down projection, same forms (may be split differently from ``gate_up``).
    gate_up_bias, down_bias : torch.Tensor or list, optional
        ``[E, N]`` biases (or pieces).
    weight_layout : {"nk", "kn"}
    gate : {"swiglu", "swiglu_interleaved"}, callable or None
        ``"swiglu"``: ``act_fn(h[:, :I]) * h[:, I:]``; ``"swiglu_interleaved"``: gate columns even,
        up columns odd; a callable maps ``[S, N]`` to ``[S, I]``; None applies ``act_fn`` alone.
    act_fn : callable, optional
        Default ``torch.nn.functional.silu``.
    info : dict, optional
        Receives ``info["method"]`` (``"grouped"``: one tensor, ``"pieces"``: split weights),
        ``activation`` and ``combine`` (``"triton"`` or ``"torch"``), ``pieces``.
    backend : str
        Grouped GEMM backend (:func:`dwdp_comm.kernels.grouped_gemm`); ``"reference"`` runs
        :func:`experts_forward_reference`.
    split_path : {"per_piece", "moe_mlp"}
        Separate pieces only (not adjacent in one storage): ``"per_piece"`` runs one
        :func:`~dwdp_comm.kernels.moe_mlp` per piece on its rows, pieces concurrently on worker
        streams, the first queued before the host waits for the row bounds; ``"moe_mlp"`` waits
        for the bounds, then one :func:`~dwdp_comm.kernels.moe_mlp` over all pieces (its own
        split-weight engine; fewer host calls).

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in ``hidden_states``' dtype, on its device and current stream.

    Raises
    ------
    InvalidArgumentError
        A bad argument (named in the message).
    GraphCaptureError
        While a CUDA graph captures, on a path that needs the token counts on the host: separate
        weight pieces, or per-expert GEMMs (float32 on CUDA, bf16 below sm90). Capture needs bf16
        weights on sm90/sm100 in one tensor or a composite view.

    Notes
    -----
    One weight tensor per projection (contiguous or a composite view): no host synchronisation
    (bf16 on sm90+; float32 on CUDA takes per-expert GEMMs, which read the counts on the host).
    Split weights: one host wait for the row bounds per call (see the module docstring). GEMMs
    in the weights' dtype (bf16), the activation in float32 rounded once, the k rows of a token
    summed in float32: Hugging Face's numerics class, not its bits.
    """
    if split_path not in SPLIT_PATHS:
        raise bad_arg("split_path", repr(split_path), f"one of {SPLIT_PATHS}")
    if backend == "reference":
        if info is not None:
            info["method"] = "reference"
        return experts_forward_reference(hidden_states, top_k_index, top_k_weights, gate_up, down,
                                         gate_up_bias=gate_up_bias, down_bias=down_bias,
                                         weight_layout=weight_layout, gate=gate, act_fn=act_fn)
    if weight_layout not in WEIGHT_LAYOUTS:
        raise bad_arg("weight_layout", repr(weight_layout), f"one of {WEIGHT_LAYOUTS}")
    if not (gate is None or callable(gate) or gate in GATES):
        raise bad_arg("gate", repr(gate), f"one of {GATES}, a callable, or None")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2:
        raise bad_arg("hidden_states", tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor)
                      else type(hidden_states).__name__, "a [num_tokens, hidden] tensor")
    t = hidden_states.shape[0]
    if not isinstance(top_k_index, torch.Tensor) or top_k_index.dim() != 2 or top_k_index.shape[0] != t:
        raise bad_arg("top_k_index", tuple(top_k_index.shape) if isinstance(top_k_index, torch.Tensor)
                      else type(top_k_index).__name__, f"a [{t}, top_k] integer tensor")
    if not isinstance(top_k_weights, torch.Tensor) or tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise bad_arg("top_k_weights", tuple(top_k_weights.shape) if isinstance(top_k_weights, torch.Tensor)
                      else type(top_k_weights).__name__, f"a {list(top_k_index.shape)} tensor, as top_k_index")
    p13, p2 = _coalesce(_pieces(gate_up, "gate_up")), _coalesce(_pieces(down, "down"))
    num_experts = p13[-1][0] + int(p13[-1][1].shape[0])
    num_down = p2[-1][0] + int(p2[-1][1].shape[0])
    if num_down != num_experts:
        raise bad_arg("down", f"{num_down} experts", f"{num_experts} experts, as gate_up")
    wdt = p13[0][1].dtype
    if wdt not in (torch.bfloat16, torch.float32):  # the grouped GEMMs take bf16 / float32 only
        if info is not None:
            info.update(method="reference", fallback=f"weights of dtype {wdt}: the per-expert reference runs")
        return experts_forward_reference(hidden_states, top_k_index, top_k_weights, gate_up, down,
                                         gate_up_bias=gate_up_bias, down_bias=down_bias,
                                         weight_layout=weight_layout, gate=gate, act_fn=act_fn)
    x = hidden_states if hidden_states.dtype == wdt else hidden_states.to(wdt)  # as HF: input cast to the weights'
    # -- issue 24 hook (smallpath): one tensor per projection takes the lean path (moe/lean.py) --
    if backend == "auto" and len(p13) == 1 and len(p2) == 1:
        res = lean.forward(x, top_k_index, top_k_weights, p13[0][1], p2[0][1], gate_up_bias=_whole_bias(gate_up_bias),
                           down_bias=_whole_bias(down_bias), weight_layout=weight_layout, gate=gate, act_fn=act_fn,
                           out_dtype=hidden_states.dtype, info=info)
        if res is not None:
            return res
    # -- end of the issue 24 hook --
    order = sort_by_expert(top_k_index, num_experts)
    cuts = sorted({f for f, _ in p13} | {f for f, _ in p2})
    if len(cuts) > 1 and x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise GraphCaptureError(
            f"experts_forward: {len(cuts)} separate weight pieces need their row bounds on the host (a wait), "
            "which a CUDA graph capture cannot contain; under capture pass one tensor per projection (the "
            "prefetch handle's composite view, weights(name), on a VMM heap)")
    wait = _row_bounds(order.offsets)[0] if len(cuts) > 1 else None
    xs = gather_tokens(x, order)
    w_rows = top_k_weights.reshape(-1)[order.order]
    mlp = dict(gate=gate, act_fn=act_fn, weight_layout=weight_layout, backend=backend)
    sub: dict = {}
    if wait is None:
        groups = kernels.TokenGroups(order.offsets, offsets=True, validate=False) if x.device.type != "cpu" else \
            kernels.TokenGroups(order.offsets, offsets=True)
        y = kernels.moe_mlp(xs, groups, p13[0][1], p2[0][1], w13_bias=_whole_bias(gate_up_bias),
                            w2_bias=_whole_bias(down_bias),
                            row_weights=w_rows, ignore_tail=True, info=sub, **mlp)
        res = combine_rows(y, order, out_dtype=hidden_states.dtype, info=sub)
        method, pieces = "grouped", 1
    elif split_path == "moe_mlp":
        groups = kernels.TokenGroups(wait(), offsets=True)  # host offsets: validated, uploaded without a sync
        y = kernels.moe_mlp(xs, groups, p13, p2, w13_bias=_whole_bias(gate_up_bias), w2_bias=_whole_bias(down_bias),
                            row_weights=w_rows, ignore_tail=True, info=sub, **mlp)
        res = combine_rows(y, order, out_dtype=hidden_states.dtype, info=sub)
        method, pieces = "pieces_moe_mlp", len(cuts)
    else:
        a13, a2 = _cut(p13, cuts), _cut(p2, cuts)
        b13, b2 = _whole_bias(gate_up_bias), _whole_bias(down_bias)
        workers = WorkerStreams(x.device, len(a13), True)
        main = torch.cuda.current_stream(x.device) if workers.streams else None
        on_host = x.device.type == "cpu"

        def run_piece(j: int, first: int, w13, w2, r0: int, r1: int | None) -> torch.Tensor:
            """Gate-up, activation and down of experts ``first ..`` on rows ``r0:r1`` (``r1`` None: from
            row 0 up to the piece's last group end, read on the device: rows past it are not computed)."""
            n = int(w13.shape[0])
            with workers.on(j):
                if r1 is None:
                    groups = kernels.TokenGroups(order.offsets[first:first + n], offsets=True, validate=on_host)
                    rows, rw = xs, w_rows
                else:
                    groups = kernels.TokenGroups(order.offsets[first:first + n] - r0, offsets=True, validate=on_host)
                    rows, rw = xs[r0:r1], w_rows[r0:r1]
                y = kernels.moe_mlp(rows, groups, w13, w2, w13_bias=None if b13 is None else b13[first:first + n],
                                    w2_bias=None if b2 is None else b2[first:first + n], row_weights=rw,
                                    ignore_tail=r1 is None, info=sub, **mlp)
                if main is not None:
                    y.record_stream(main)  # allocated on a worker, read by the combine on the current stream
            return y

        outs, jobs = [], 0
        workers.fork()
        try:
            # The first piece starts at row 0: it is queued before the host waits for the row bounds,
            # so the GPU computes while the host waits and then queues the other pieces.
            (f0, w13_0), (_, w2_0) = a13[0], a2[0]
            early = run_piece(0, f0, w13_0, w2_0, 0, None)
            ends = wait()
            end0 = ends[int(w13_0.shape[0]) - 1]
            if end0 > 0:
                outs.append((0, early[:end0]))
                jobs += 1
            for j, ((first, w13), (_, w2)) in enumerate(zip(a13[1:], a2[1:]), start=1):
                r0, r1 = ends[first - 1], ends[first + int(w13.shape[0]) - 1]
                if r1 > r0:
                    outs.append((r0, run_piece(j, first, w13, w2, r0, r1)))
                    jobs += 1
        finally:
            workers.join()
        if outs:
            res = combine_rows(outs, order, out_dtype=hidden_states.dtype, info=sub)
        else:
            res = hidden_states.new_zeros(t, hidden_states.shape[1])
            sub["combine"] = "none"
        method, pieces = "pieces", jobs
    if info is not None:
        info.update(method=method, pieces=pieces, activation=sub.get("activation"), combine=sub.get("combine"))
    return res


def _whole_bias(b: Any) -> Any:
    """A bias given whole or as pieces, as one ``[E, N]`` tensor (a view when the pieces are adjacent)."""
    if b is None or isinstance(b, torch.Tensor):
        return b
    parts = _coalesce(_pieces_bias(b))
    return parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in parts])
