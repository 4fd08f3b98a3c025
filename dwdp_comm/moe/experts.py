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
pieces concurrently on worker streams, and the combine reading every piece's result in place
(the one split-weight engine, :func:`_run_pieces`). The reference :func:`experts_forward_reference`
(:mod:`dwdp_comm.moe.experts_reference`) is the oracle of the tests.

Quantized weights (``weight_format``: ``fp8_channel``, ``fp8_block``, ``mxfp4``;
:mod:`dwdp_comm.kernels.quant`) take the same steps with the format's GEMM engine:
``torch._scaled_grouped_mm`` for per-channel fp8, the Triton block-FP8 and MXFP4 kernels
(:mod:`dwdp_comm.kernels.quant_gemm`), which read split pieces in place through a device table of
expert addresses (no host wait: one call whatever the split). Where a format's kernel does not run
(CPU; mxfp4 past the rule's rows per expert) the weights are dequantized to one bf16 tensor and the
bf16 path runs: on CPU, dequantize then the bf16 numerics.

The steps, each a function: :func:`_check_args` (validate), :meth:`Projection.build` (normalise),
:func:`_engine` (pick the per-format GEMM engine), :func:`sort_by_expert` + :func:`gather_tokens`
(route/sort), :func:`_run_whole` / :func:`_run_pieces` (GEMMs), :func:`combine_rows` (combine).
"""


from __future__ import annotations

from typing import Any, Callable

import torch

from .. import kernels
from ..errors import GraphCaptureError, bad_arg
from ..kernels import quant, quant_gemm
from ..kernels.workers import WorkerStreams
from . import lean
from .experts_reference import GATES, WEIGHT_LAYOUTS, experts_forward_reference
from .projections import Projection, bias_table
from .tokens import TokenOrder, combine_rows, gather_tokens, sort_by_expert

__all__ = ["experts_forward", "experts_forward_reference", "GATES", "WEIGHT_LAYOUTS", "SPLIT_PATHS"]

SPLIT_PATHS = ("per_piece", "moe_mlp")


def _row_bounds(offsets: torch.Tensor) -> Callable[[], list[int]]:
    """Start an asynchronous host copy of the end offsets; the returned ``wait()`` gives them as a list."""
    if offsets.device.type != "cuda":
        return offsets.tolist
    host = torch.empty(offsets.shape, dtype=offsets.dtype, pin_memory=True)
    host.copy_(offsets, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()

    def wait():
        ev.synchronize()  # a host wait: only for split weights, after the gather is queued
        return host.tolist()
    return wait


def _shape(t: Any) -> Any:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_args(hidden_states, top_k_index, top_k_weights, weight_layout, gate, split_path) -> None:
    """Validate the arguments that are not weights (each error names its argument)."""
    if split_path not in SPLIT_PATHS:
        raise bad_arg("split_path", repr(split_path), f"one of {SPLIT_PATHS}")
    if weight_layout not in WEIGHT_LAYOUTS:
        raise bad_arg("weight_layout", repr(weight_layout), f"one of {WEIGHT_LAYOUTS}")
    if not (gate is None or callable(gate) or gate in GATES):
        raise bad_arg("gate", repr(gate), f"one of {GATES}, a callable, or None")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2:
        raise bad_arg("hidden_states", _shape(hidden_states), "a [num_tokens, hidden] tensor")
    t = hidden_states.shape[0]
    if not isinstance(top_k_index, torch.Tensor) or top_k_index.dim() != 2 or top_k_index.shape[0] != t:
        raise bad_arg("top_k_index", _shape(top_k_index), f"a [{t}, top_k] integer tensor")
    if not isinstance(top_k_weights, torch.Tensor) or tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise bad_arg("top_k_weights", _shape(top_k_weights), f"a {list(top_k_index.shape)} tensor, as top_k_index")


def _engine(p13: Projection, p2: Projection, device: torch.device, rows_per_expert: float, info: dict
            ) -> tuple[Projection, Projection, bool]:
    """The per-format GEMM engine: ``(gate_up, down, native_split)``.

    Where the format's own kernel does not run here (or the mxfp4 rule prefers the bf16 path),
    both projections come back dequantized into one bf16 tensor each (a copy; ``info["fallback"]``
    says why). ``native_split``: the engine reads separate pieces in place (the Triton kernels'
    expert tables), so they need no host-side row bounds."""
    if p13.fmt == "bf16":
        return p13, p2, False
    if p13.fmt == "fp8_channel":  # torch._scaled_grouped_mm where it runs
        why = quant_gemm.native_unavailable_reason(p13.fmt, device)
        path = "dequantize" if why else "native"
    else:
        path, why = quant_gemm.choose_path(p13.fmt, device, rows_per_expert, p13.block_size)
    if path == "dequantize":
        info["fallback"] = f"{p13.fmt}: {why}: weights dequantized to bf16"
        return p13.dequantized(), p2.dequantized(), False
    return p13, p2, p13.fmt in ("fp8_block", "mxfp4")


def _mlp_args(p13: Projection, gate, act_fn, backend) -> dict:
    extra = {} if p13.fmt == "bf16" else {"weight_format": p13.fmt, "block_size": p13.block_size}
    return dict(gate=gate, act_fn=act_fn, weight_layout=p13.layout, backend=backend, **extra)


def _run_whole(xs, order: TokenOrder, w_rows, p13: Projection, p2: Projection, b13, b2, mlp: dict, sub: dict,
               groups=None, fused_gather: bool = False) -> torch.Tensor:
    """One :func:`~dwdp_comm.kernels.moe_mlp` over all rows: one tensor per projection, or pieces the
    engine reads in place. Device offsets, no host wait (``groups``: host-validated ones instead).
    ``fused_gather``: ``xs`` are the un-permuted tokens, permuted inside the first GEMM's quantizer."""
    if groups is None:
        groups = kernels.TokenGroups(order.offsets, offsets=True, validate=xs.device.type == "cpu")
    (w13, s13), (w2, s2) = p13.kernel_weights(), p2.kernel_weights()
    gather = dict(x_rows=order.order, x_top_k=order.top_k) if fused_gather else {}
    return kernels.moe_mlp(xs, groups, w13, w2, w13_scales=s13, w2_scales=s2, w13_bias=b13, w2_bias=b2,
                           row_weights=w_rows, ignore_tail=True, info=sub, **gather, **mlp)


def _run_pieces(xs, order: TokenOrder, w_rows, p13: Projection, p2: Projection, b13, b2, mlp: dict, sub: dict,
                cuts: list[int], wait) -> list:
    """The split-weight engine: gate-up, activation and down of each piece on its own rows, pieces
    concurrently on worker streams. The first piece (rows from 0) is queued before the host waits
    for the row bounds, so the GPU computes while the host waits. Returns ``[(first_row, y), ...]``."""
    a13, a2 = p13.cut(cuts), p2.cut(cuts)
    workers = WorkerStreams(xs.device, len(a13.pieces), True)
    main = torch.cuda.current_stream(xs.device) if workers.streams else None
    on_host = xs.device.type == "cpu"

    def run_piece(j: int, first: int, n: int, r0: int, r1: int | None) -> torch.Tensor:
        """Experts ``first .. first + n - 1`` on rows ``r0:r1`` (``r1`` None: from row 0 up to the
        piece's last group end, read on the device: rows past it are not computed)."""
        (w13, s13), (w2, s2) = a13.sub(first, n), a2.sub(first, n)
        with workers.on(j):
            offs = order.offsets[first:first + n]
            groups = kernels.TokenGroups(offs if r1 is None else offs - r0, offsets=True, validate=on_host)
            rows, rw = (xs, w_rows) if r1 is None else (xs[r0:r1], w_rows[r0:r1])
            y = kernels.moe_mlp(rows, groups, w13, w2, w13_scales=s13, w2_scales=s2,
                                w13_bias=None if b13 is None else b13[first:first + n],
                                w2_bias=None if b2 is None else b2[first:first + n], row_weights=rw,
                                ignore_tail=r1 is None, info=sub, **mlp)
            if main is not None:
                y.record_stream(main)  # allocated on a worker, read by the combine on the current stream
        return y

    outs = []
    workers.fork()
    try:
        f0, t0 = a13.pieces[0]
        early = run_piece(0, f0, int(t0.shape[0]), 0, None)
        ends = wait()
        end0 = ends[int(t0.shape[0]) - 1]
        if end0 > 0:
            outs.append((0, early[:end0]))
        for j, (first, t) in enumerate(a13.pieces[1:], start=1):
            n = int(t.shape[0])
            r0, r1 = ends[first - 1], ends[first + n - 1]
            if r1 > r0:
                outs.append((r0, run_piece(j, first, n, r0, r1)))
    finally:
        workers.join()
    return outs


def experts_forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    gate_up: Any, down: Any, *, gate_up_scale: Any = None, down_scale: Any = None,
                    weight_format: str | None = None, block_size: Any = quant.DEFAULT_BLOCK_SIZE,
                    gate_up_bias: Any = None, down_bias: Any = None,
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
    gate_up_scale, down_scale : torch.Tensor or list, optional
        Scales of quantized weights, whole or as pieces (any split; a prefetch handle gives each
        split like its weight): ``fp8_channel`` float32 ``[E, N]``; ``fp8_block`` float32
        ``[E, ceil(N/bn), ceil(K/bk)]`` (Hugging Face's ``weight_scale_inv``); ``mxfp4`` uint8 e8m0
        ``[E, N, K/32]`` (:mod:`dwdp_comm.kernels.quant`).
    weight_format : {"bf16", "fp8_channel", "fp8_block", "mxfp4"}, optional
        None infers it from the dtypes and the scales. Other formats (NVFP4, int4, ...) raise
        :class:`~dwdp_comm.kernels.quant.UnsupportedFormatError`. Quantized formats: bf16 GEMM
        inputs (the hidden states are cast), ``weight_layout="nk"`` only.
    block_size : (int, int)
        ``fp8_block``: ``(bn, bk)`` of the weight scales (default ``(128, 128)``); activations are
        quantized per token and per ``bk`` columns on the fast path.
    gate_up_bias, down_bias : torch.Tensor or list, optional
        ``[E, N]`` biases (or pieces).
    weight_layout : {"nk", "kn"}
    gate : {"swiglu", "swiglu_interleaved"}, callable or None
        ``"swiglu"``: ``act_fn(h[:, :I]) * h[:, I:]``; ``"swiglu_interleaved"``: gate columns even,
        up columns odd; a callable maps ``[S, N]`` to ``[S, I]``; None applies ``act_fn`` alone.
    act_fn : callable, optional
        Default ``torch.nn.functional.silu``.
    info : dict, optional
        Receives ``info["method"]`` (``"grouped"``: one tensor, or pieces the format's kernel reads
        in place; ``"pieces"``: the split-weight engine), ``format``, ``activation`` and ``combine``
        (``"triton"`` or ``"torch"``), ``pieces``, ``gemm`` (what the gate-up GEMM ran) and, where
        quantized weights were dequantized, ``fallback`` (why).
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
        weights on sm90/sm100 in one tensor or a composite view, or ``fp8_block`` / ``mxfp4``
        weights on their Triton kernels (one tensor or pieces).

    Notes
    -----
    One weight tensor per projection (contiguous or a composite view): no host synchronisation
    (bf16 on sm90+; float32 on CUDA takes per-expert GEMMs, which read the counts on the host).
    Split weights: one host wait for the row bounds per call (see the module docstring). GEMMs
    in the weights' dtype (bf16), the activation in float32 rounded once, the k rows of a token
    summed in float32: Hugging Face's numerics class, not its bits.
    """
    _check_args(hidden_states, top_k_index, top_k_weights, weight_layout, gate, split_path)
    p13, p2 = Projection.pair(gate_up, gate_up_scale, down, down_scale, fmt=weight_format, block_size=block_size,
                              layout=weight_layout)
    if backend == "reference":
        if info is not None:
            info.update(method="reference", format=p13.fmt)
        return experts_forward_reference(hidden_states, top_k_index, top_k_weights, gate_up, down,
                                         gate_up_scale=gate_up_scale, down_scale=down_scale, weight_format=p13.fmt,
                                         block_size=block_size, gate_up_bias=gate_up_bias, down_bias=down_bias,
                                         weight_layout=weight_layout, gate=gate, act_fn=act_fn)
    notes: dict = {"format": p13.fmt}
    num_experts, k = p13.num_experts, int(top_k_index.shape[1])
    p13, p2, native_split = _engine(p13.coalesced(), p2.coalesced(), hidden_states.device,
                                    hidden_states.shape[0] * k / num_experts, notes)
    if p13.dtype not in (torch.bfloat16, torch.float32) and p13.fmt == "bf16":  # fp16: the reference runs
        notes.update(method="reference", fallback=f"weights of dtype {p13.dtype}: the per-expert reference runs")
        if info is not None:
            info.update(notes)
        return experts_forward_reference(hidden_states, top_k_index, top_k_weights, gate_up, down,
                                         gate_up_bias=gate_up_bias, down_bias=down_bias,
                                         weight_layout=weight_layout, gate=gate, act_fn=act_fn)
    xdt = p13.dtype if p13.fmt == "bf16" else torch.bfloat16  # as HF: the input cast to the GEMMs' dtype
    x = hidden_states if hidden_states.dtype == xdt else hidden_states.to(xdt)
    if backend == "auto" and p13.fmt == "bf16" and len(p13.pieces) == 1 and len(p2.pieces) == 1:
        # one bf16 tensor per projection: the lean path (moe/lean.py: fused route, inline MLP, fewest host
        # steps); None where it does not apply (then the general path below runs)
        res = lean.forward(x, top_k_index, top_k_weights, p13.pieces[0][1], p2.pieces[0][1],
                           gate_up_bias=bias_table(gate_up_bias, "gate_up_bias"),
                           down_bias=bias_table(down_bias, "down_bias"), weight_layout=weight_layout, gate=gate,
                           act_fn=act_fn, out_dtype=hidden_states.dtype, info=info)
        if res is not None:
            if info is not None:
                info.update(notes)
            return res
    order = sort_by_expert(top_k_index, num_experts)
    cuts = sorted(p13.cuts | p2.cuts)
    separate = len(cuts) > 1 and not native_split
    if separate and x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise GraphCaptureError(
            f"experts_forward: {len(cuts)} separate weight pieces need their row bounds on the host (a wait), "
            "which a CUDA graph capture cannot contain; under capture pass one tensor per projection (the "
            "prefetch handle's composite view, weights(name), on a VMM heap)")
    wait = _row_bounds(order.offsets) if separate else None
    # the block-FP8 kernel's activation quantizer reads the token rows in place: no gathered copy
    fused = not separate and native_split and p13.fmt == "fp8_block" and backend in ("auto", "triton")
    xs = x if fused else gather_tokens(x, order)
    w_rows = top_k_weights.reshape(-1)[order.order]
    mlp = _mlp_args(p13, gate, act_fn, backend)
    b13, b2 = bias_table(gate_up_bias, "gate_up_bias"), bias_table(down_bias, "down_bias")
    sub: dict = {}
    if not separate:
        y = _run_whole(xs, order, w_rows, p13, p2, b13, b2, mlp, sub, fused_gather=fused)
        method, pieces = "grouped", len(cuts)
    elif split_path == "moe_mlp":
        groups = kernels.TokenGroups(wait(), offsets=True)  # host offsets: validated, uploaded without a sync
        y = _run_whole(xs, order, w_rows, p13, p2, b13, b2, mlp, sub, groups=groups)
        method, pieces = "pieces_moe_mlp", len(cuts)
    else:
        y = _run_pieces(xs, order, w_rows, p13, p2, b13, b2, mlp, sub, cuts, wait)
        method, pieces = "pieces", len(y)
    if isinstance(y, list) and not y:
        res = hidden_states.new_zeros(hidden_states.shape)
        sub["combine"] = "none"
    else:
        res = combine_rows(y, order, out_dtype=hidden_states.dtype, info=sub)
    if info is not None:
        gemm = sub.get("gate_up", {})
        info.update(notes, method=method, pieces=pieces, activation=sub.get("activation"),
                    combine=sub.get("combine"), gemm=gemm.get("method"))
    return res
