"""Grouped GEMM over split expert weights, and the MoE MLP built on it.

A DWDP rank computes every expert of a layer, but each expert's weights live either in local
memory (its shard) or in a prefetch slot. These functions read both in place, never merging them:

- one ``[E, K, N]`` tensor: contiguous, or a composite view (one virtual range mapped onto the
  local shard and the slot pages, :meth:`dwdp_comm.PrefetchHandle.weights`);
- split weights: ``(first_expert, tensor[count, K, N])`` segments
  (:meth:`dwdp_comm.PrefetchHandle.weight_segments`), or a list of per-expert ``[K, N]`` /
  per-owner ``[count, K, N]`` tensors in expert order.

Backends (``backend=``):

``"reference"``
    One matmul per expert in float64: the oracle. Any device, any strides, fp8 included.
``"torch"``
    ``torch._grouped_mm`` (one call on a single tensor or composite view; one call per piece on
    split weights), ``torch._scaled_grouped_mm`` for fp8, per-expert ``torch.mm`` where those
    cannot run. Force a method with ``"torch:grouped_mm"``, ``"torch:segments"``,
    ``"torch:segments_async"``, ``"torch:segments_direct"``, ``"torch:per_expert"`` (see
    :mod:`dwdp_comm.kernels.torch_grouped`).
``"numba"``
    A Numba CUDA kernel reading per-expert weight pointers (split weights natively), on a GPU or
    in the CUDA simulator. ``"numba:<config>"`` picks a tile shape
    (:data:`dwdp_comm.kernels.numba_grouped.CONFIGS`). bf16 and float32 only.
``"auto"`` (default)
    ``"torch"``; for fp8 where ``torch._scaled_grouped_mm`` cannot run, ``"reference"``.

Pass ``info={}`` to learn what ran: ``info["backend"]``, ``info["method"]`` and, where a fallback
happened, ``info["fallback"]`` (why).

Layout convention: weights are logically ``[E, K, N]`` and ``out_e = x_e @ w[e]``. Row-major
``[E, K, N]`` is the native layout; ``[E, N, K]`` storage passed as ``w.transpose(-1, -2)`` works
too and is required for fp8. Token rows of ``x`` are grouped by expert, in expert order.

Numba is imported only when the Numba backend runs (``import dwdp_comm.kernels`` never imports it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import bad_arg, bad_type
from ._inputs import Problem, TokenGroups, make_problem
from . import reference as _reference
from . import torch_grouped as _torch

__all__ = ["grouped_gemm", "moe_mlp", "swiglu", "available_backends", "TokenGroups", "make_problem",
           "quantize_rowwise", "BACKENDS"]

BACKENDS = ("auto", "reference", "torch", "numba")
quantize_rowwise = _reference.quantize_rowwise


def grouped_gemm(x: torch.Tensor, m_sizes_or_offsets: Any, weights: Any, *, offsets: bool = False,
                 weight_scales: Any = None, x_scales: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, backend: str = "auto",
                 info: dict | None = None) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]`` for every expert ``e``, over split weights.

    Parameters
    ----------
    x : torch.Tensor
        ``[num_tokens, K]`` bf16 or float32, rows grouped by expert in expert order. With fp8
        weights: bf16 (quantized per row inside), or float8_e4m3fn already quantized, with
        ``x_scales``.
    m_sizes_or_offsets : sequence of int, numpy.ndarray, torch.Tensor or TokenGroups
        ``[num_experts]`` integers: token counts per expert (default), or, with ``offsets=True``,
        cumulative end offsets as ``torch._grouped_mm``'s ``offs`` (``offs[e]`` = end row of
        expert ``e``; ``offs[-1] == num_tokens``). Zero-token experts are allowed. Host values
        (list, numpy, CPU tensor) cost no synchronisation (validated on the host, uploaded
        asynchronously); a device tensor is copied to the host once (a sync). Build a
        :class:`TokenGroups` once per layer to reuse across calls, with ``validate=False`` for
        device-resident counts that must not sync (costs: :class:`TokenGroups`).
    weights : torch.Tensor or list
        ``[num_experts, K, N]`` (contiguous or a composite view), or split weights: a list of
        ``(first_expert, tensor[count, K, N])`` segments covering experts ``0..E-1`` in order, or
        a list of per-expert ``[K, N]`` / per-owner ``[count, K, N]`` tensors whose counts sum to
        ``num_experts``. Dtype bf16, float32 or float8_e4m3fn; same device as ``x``; read in place.
    offsets : bool
        How to read ``m_sizes_or_offsets`` (ignored for a TokenGroups).
    weight_scales : torch.Tensor or list, optional
        fp8 only: float32 per-output-channel scales, ``[num_experts, N]`` or pieces shaped like
        ``weights`` (``[count, N]`` / ``[N]``). ``w_real[e] = w[e].float() * scales[e][None, :]``.
    x_scales : torch.Tensor, optional
        Pre-quantized fp8 ``x`` only: float32 ``[num_tokens]``, ``x_real = x.float() * x_scales[:, None]``
        (what :func:`quantize_rowwise` returns).
    out : torch.Tensor, optional
        ``[num_tokens, N]`` contiguous, the result's dtype. With the torch backend it costs one extra
        device copy of the result (``torch._grouped_mm`` has no ``out=``); leave it None for speed.
    backend : str
        ``"auto"``, ``"reference"``, ``"torch"[:method]``, ``"numba"[:config]`` (module docstring).
    info : dict, optional
        Filled with ``backend``, ``method`` and, on a fallback, ``fallback``.

    Returns
    -------
    torch.Tensor
        ``[num_tokens, N]`` in x's dtype (bf16 for fp8 weights), on x's device.

    Raises
    ------
    InvalidArgumentError
        A shape, dtype, device, count or offset that does not fit (the message names it).
    BackendUnavailableError
        The backend asked for cannot run here (the message says why).

    Notes
    -----
    Streams: GPU work is enqueued on the current stream of x's device; split weights on CUDA
    also use up to 4 worker streams, forked from it and joined back before the call returns, so
    the result is ready on the current stream. The host does not wait, except to copy
    device-resident token counts to the host (see ``m_sizes_or_offsets``).

    Cost with the torch backend and valid inputs: one weight tensor (contiguous or composite
    view) runs exactly one ``torch._grouped_mm`` (once the groups' device offsets exist: one
    asynchronous 4-byte-per-expert upload per :class:`TokenGroups`). Split weights on CUDA
    (``segments_direct``): one grouped call for the first piece, in place; in the others one
    ``torch.mm`` per expert with at least ``DIRECT_MIN_ROWS`` rows, straight into the output, and
    one grouped call per run of smaller experts plus a device copy of its rows
    (``torch._grouped_mm`` has no ``out=``), concurrent on worker streams
    (:mod:`dwdp_comm.kernels.torch_grouped`). Memory: the runs' temporaries are allocated on the
    worker streams, so the caching allocator keeps them cached there (reusable by later split
    calls from the same stream, not by other work on the current stream). fp8 and
    ``"torch:segments_async"`` run whole pieces that way: up to ``(G - 1) / G`` of a result.
    """
    p = make_problem(x, m_sizes_or_offsets, weights, offsets=offsets, weight_scales=weight_scales,
                     x_scales=x_scales, out=out)
    return _dispatch(p, backend, info)


def _dispatch(p: Problem, backend: str, info: dict | None) -> torch.Tensor:
    if not isinstance(backend, str):
        raise bad_type("backend", backend, "a str")
    name, _, option = backend.partition(":")
    if name not in BACKENDS or (option and name not in ("torch", "numba")):
        raise bad_arg("backend", backend, f"one of {BACKENDS}, 'torch:<method>' or 'numba:<config>'")
    info = {} if info is None else info
    if not isinstance(info, dict):
        raise bad_type("info", info, "a dict or None")
    info.clear()
    if name == "auto":
        name = "torch"
        if p.is_fp8:
            why = _torch.fp8_unavailable_reason(p.device)
            if why:
                name, info["fallback"] = "reference", why
    info["backend"] = name
    if name == "reference":
        info.setdefault("method", "per_expert_fp64")
        return _reference.run(p)
    if name == "torch":
        return _torch.run(p, method=option or "auto", info=info)
    from . import numba_grouped  # imports numba only now
    return numba_grouped.run(p, config=option or None, info=info)


def swiglu(h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU: ``silu(h[:, :I]) * h[:, I:]`` for ``h`` ``[T, 2I]`` (gate half first, then up).

    Computed in float32, returned in h's dtype (or written to ``out`` ``[T, I]``).
    """
    if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[1] % 2:
        raise bad_arg("h", tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__,
                      "a [num_tokens, 2 * intermediate] tensor")
    i = h.shape[1] // 2
    g, u = h[:, :i].float(), h[:, i:].float()
    a = F.silu(g).mul_(u)
    if out is not None:
        return out.copy_(a)
    return a.to(h.dtype)


def moe_mlp(x: torch.Tensor, m_sizes_or_offsets: Any, w13: Any, w2: Any, *, offsets: bool = False,
            w13_scales: Any = None, w2_scales: Any = None, backend: str = "auto",
            info: dict | None = None) -> torch.Tensor:
    """Routed-expert MLP over split weights: gate-up grouped GEMM, SwiGLU, down grouped GEMM.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` bf16 or float32, rows grouped by expert in expert order (each routed copy of a
        token is one row; combining the top-k rows back per token is the caller's job).
    m_sizes_or_offsets : sequence, array, tensor or TokenGroups
        ``[E]`` token counts (or end offsets with ``offsets=True``), as in :func:`grouped_gemm`.
    w13 : torch.Tensor or list
        ``[E, H, 2I]`` gate (columns ``[0, I)``) and up (``[I, 2I)``) projections, or split pieces.
    w2 : torch.Tensor or list
        ``[E, I, H]`` down projection, or split pieces.
    w13_scales, w2_scales : optional
        fp8 per-channel scales (``[E, 2I]`` and ``[E, H]``, or pieces), as in :func:`grouped_gemm`.
    backend : str
        Used for both GEMMs.
    info : dict, optional
        Receives ``gate_up`` and ``down``: the info of each GEMM.

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in x's dtype. The intermediate ``[T, I]`` activation is rounded to x's dtype.

    Notes
    -----
    With split bf16/float32 weights and the torch backend on CUDA (``segments_direct``), both
    GEMMs write their rows in place (:mod:`dwdp_comm.kernels.torch_grouped`), then SwiGLU runs
    once as on one tensor. Otherwise (``"torch:segments"`` / ``"torch:segments_async"``, fp8,
    CPU), SwiGLU is applied
    to each piece's gate-up rows as they come (:func:`dwdp_comm.kernels.torch_grouped.run_rows`),
    so the gate-up result is never assembled. Streams: as :func:`grouped_gemm` (on CUDA the pieces run on worker streams forked
    from the current one and joined back; ``backend="torch:segments"`` keeps everything on the
    current stream, in order).
    """
    groups = m_sizes_or_offsets if isinstance(m_sizes_or_offsets, TokenGroups) else \
        TokenGroups(m_sizes_or_offsets, offsets=offsets)
    i1, i2 = {}, {}
    p13 = make_problem(x, groups, w13, weight_scales=w13_scales)
    method = backend.partition(":")[2] or "auto"  # the same streams rule as the down GEMM's
    if len(p13.pieces) > 1 and backend in ("auto", "torch", "torch:segments", "torch:segments_async") and \
            _torch._direct_min_rows(method, p13.device, p13.is_fp8) is None and \
            not (p13.is_fp8 and _torch.fp8_unavailable_reason(p13.device)):
        # Split weights, no direct writes: SwiGLU straight from each piece's gate-up rows (no
        # [T, 2I] assembly copy). With segments_direct (auto on CUDA) the gate-up result lands in
        # place anyway: one [T, 2I] result, then SwiGLU, as on one tensor.
        if p13.N % 2:
            raise bad_arg("w13", f"N = {p13.N}", "an even N = 2 * intermediate (gate, then up)")
        a = torch.empty(p13.num_tokens, p13.N // 2, dtype=x.dtype, device=x.device)
        _torch.run_rows(p13, lambda r0, r1, y: swiglu(y, out=a[r0:r1]), info=i1,
                        overlap=_torch._overlap(method, p13.device))
        i1["backend"] = "torch"
    else:
        a = swiglu(_dispatch(p13, backend, i1))
    y = grouped_gemm(a, groups, w2, weight_scales=w2_scales, backend=backend, info=i2)
    if info is not None:
        info.update(gate_up=i1, down=i2)
    return y


def available_backends(device: Any = "cpu", *, reasons: bool = False):
    """Which backends can run on ``device``.

    Parameters
    ----------
    device : str or torch.device
    reasons : bool
        False: a list of names. True: a dict name -> None (available) or the reason it is not.
        The dict also has ``"torch-fp8"`` (fp8 weights through ``torch._scaled_grouped_mm``).

    Notes
    -----
    Checking ``"numba"`` imports numba (and, on a GPU machine, initialises its CUDA driver).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        status = dict.fromkeys(("reference", "torch", "torch-fp8"), "torch.cuda is not available")
    else:
        status = {"reference": None, "torch": None, "torch-fp8": _torch.fp8_unavailable_reason(device)}
    from ._numba_compat import is_simulator, unavailable_reason
    why = unavailable_reason()
    if why is None:
        sim = is_simulator()
        if sim and device.type != "cpu":
            why = "numba runs in the simulator here (NUMBA_ENABLE_CUDASIM=1): CPU tensors only"
        elif not sim and device.type != "cuda":
            why = "numba kernels need CUDA tensors (or NUMBA_ENABLE_CUDASIM=1 for CPU tensors)"
    status["numba"] = why
    if reasons:
        return status
    return [k for k in ("reference", "torch", "numba") if status[k] is None]
