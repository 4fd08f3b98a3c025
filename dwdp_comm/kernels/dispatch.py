"""The grouped GEMM entry point: validate, pick a backend, run.

:func:`grouped_gemm` validates its arguments once (:func:`~dwdp_comm.kernels.problem.make_problem`)
and hands the :class:`~dwdp_comm.kernels.problem.Problem` to :func:`run_problem`, which runs the
backend asked for (``reference``, ``torch``, ``numba``; ``auto``: torch, or the reference for
per-channel fp8 where torch cannot; ``fp8_block`` / ``mxfp4`` weights go to
:mod:`dwdp_comm.kernels.quant_gemm`, whose ``auto`` is its Triton kernel or dequantize + torch).
:func:`available_backends` says which can run where.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import BackendUnavailableError, bad_arg, bad_type
from . import quant_gemm, reference, torch_path
from .capabilities import fp8_unavailable_reason
from .problem import Problem, make_problem
from .quant import DEFAULT_BLOCK_SIZE
from .torch_path import DIRECT_MIN_ROWS, check_direct_min_rows

__all__ = ["grouped_gemm", "run_problem", "available_backends", "BACKENDS"]

BACKENDS = ("auto", "reference", "torch", "numba", "triton")


def grouped_gemm(x: torch.Tensor, m_sizes_or_offsets: Any, weights: Any, *, offsets: bool = False,
                 weight_scales: Any = None, x_scales: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, backend: str = "auto",
                 info: dict | None = None, ignore_tail: bool = False,
                 direct_min_rows: int = DIRECT_MIN_ROWS, weight_format: str | None = None,
                 block_size: Any = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
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
        Quantized weights only, whole or as pieces split any way. ``fp8_channel``: float32
        per-output-channel scales ``[num_experts, N]`` (``w_real[e] = w[e].float() * scales[e][None, :]``);
        ``fp8_block``: float32 ``[E, ceil(N/bn), ceil(K/bk)]``; ``mxfp4``: uint8 e8m0 ``[E, N, K/32]``
        (:mod:`dwdp_comm.kernels.quant`). Quantized weights are ``[E, N, K]`` storage passed as
        ``w.transpose(-1, -2)`` (mxfp4: the ``[E, N, K/2]`` bytes transposed).
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
    ignore_tail : bool
        Allow the groups to cover fewer rows than ``x`` has: the rows past the last group are not
        computed and their output rows are undefined (sentinel copies sorted to the end).
    weight_format : str, optional
        One of :data:`dwdp_comm.kernels.quant.WEIGHT_FORMATS`; None infers it from the dtypes and
        the scales' rank. ``fp8_block`` and ``mxfp4`` run :mod:`dwdp_comm.kernels.quant_gemm`
        (``auto``: their Triton kernel where it runs, else dequantize + the bf16 torch path;
        ``"triton"`` forces the kernel, ``"torch"`` the dequantize path).
    block_size : (int, int)
        ``fp8_block`` only: ``(bn, bk)`` of the weight scales (activations are quantized per row
        and per ``bk`` columns).
    direct_min_rows : int
        Torch ``segments_direct`` only (split weights on CUDA): experts with at least this many
        rows run as their own ``torch.mm`` straight into the output, smaller ones grouped.
        Default :data:`dwdp_comm.kernels.torch_path.DIRECT_MIN_ROWS` (128); raise it where the
        host is the bottleneck (one launch per such expert). Ignored by the other methods.

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
    ``torch.mm`` per expert with at least ``direct_min_rows`` rows, straight into the output, and
    one grouped call per run of smaller experts plus a device copy of its rows
    (``torch._grouped_mm`` has no ``out=``), concurrent on worker streams
    (:mod:`dwdp_comm.kernels.torch_path`). Memory: the runs' temporaries are allocated on the
    worker streams, so the caching allocator keeps them cached there (reusable by later split
    calls from the same stream, not by other work on the current stream). fp8 and
    ``"torch:segments_async"`` run whole pieces that way: up to ``(G - 1) / G`` of a result.
    """
    p = make_problem(x, m_sizes_or_offsets, weights, offsets=offsets, weight_scales=weight_scales,
                     x_scales=x_scales, out=out, ignore_tail=ignore_tail, weight_format=weight_format,
                     block_size=block_size)
    return run_problem(p, backend, info, direct_min_rows=direct_min_rows)


def run_problem(p: Problem, backend: str = "auto", info: dict | None = None, *,
                direct_min_rows: int = DIRECT_MIN_ROWS) -> torch.Tensor:
    """Run a validated problem (:func:`~dwdp_comm.kernels.problem.make_problem`) on ``backend``.

    Arguments, result, streams and errors as :func:`grouped_gemm` (which is ``make_problem`` then
    this); callers holding a :class:`~dwdp_comm.kernels.problem.Problem` skip the re-validation.
    """
    direct_min_rows = check_direct_min_rows(direct_min_rows)
    if not isinstance(backend, str):
        raise bad_type("backend", backend, "a str")
    name, _, option = backend.partition(":")
    if name not in BACKENDS or (option and name not in ("torch", "numba")) or \
            (name == "triton" and p.fmt not in ("fp8_block", "mxfp4")):
        raise bad_arg("backend", backend, f"one of {BACKENDS} ('triton': fp8_block / mxfp4 weights), 'torch:<method>' or "
                      "'numba:<config>'")
    info = {} if info is None else info
    if not isinstance(info, dict):
        raise bad_type("info", info, "a dict or None")
    info.clear()
    if p.fmt in ("fp8_block", "mxfp4") and name != "reference":
        if name == "numba":
            raise BackendUnavailableError(f"backend 'numba' does not run {p.fmt} weights; use 'auto', 'triton', "
                                          "'torch' (dequantize) or 'reference'")
        return quant_gemm.run(p, {"torch": "dequantize"}.get(name, name), info, direct_min_rows=direct_min_rows)
    if name == "auto":
        name = "torch"
        if p.is_fp8:
            why = fp8_unavailable_reason(p.device)
            if why:
                name, info["fallback"] = "reference", why
    info["backend"] = name
    if name == "reference":
        info.setdefault("method", "per_expert_fp64")
        return reference.run(p)
    if name == "torch":
        return torch_path.run(p, method=option or "auto", info=info, direct_min_rows=direct_min_rows)
    from . import numba_grouped  # imports numba only now
    return numba_grouped.run(p, config=option or None, info=info)


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
        status = {"reference": None, "torch": None, "torch-fp8": fp8_unavailable_reason(device)}
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
