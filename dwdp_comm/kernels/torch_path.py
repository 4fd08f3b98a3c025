"""The torch path: ``torch._grouped_mm`` / ``torch._scaled_grouped_mm`` over weight pieces.

:func:`choose_method` decides which method runs (:func:`split_strategy`: how split weights run);
:func:`run` runs it (the split pieces through :mod:`dwdp_comm.kernels.segments`); :func:`run_rows`
hands each piece's rows to a consumer instead of assembling them.

Methods (``info["method"]`` says which ran):

``grouped_mm``
    One weight tensor (contiguous, or a composite view: one virtual range whose pages come from
    several buffers): a single ``torch._grouped_mm`` call, and nothing else on the device once the
    token groups' device offsets exist. This is the route DWDP prefers.
``segments``
    Split weights: one ``torch._grouped_mm`` per piece on that piece's rows of ``x`` (a view),
    with offsets relative to the piece's first row (uploaded once per :class:`TokenGroups`).
    ``torch._grouped_mm`` has no ``out=`` (its schema is ``(self, mat2, offs, bias, out_dtype)``),
    so one piece only can land in the result without a copy: the first, run on the whole of ``x``
    with only its own groups, makes the op allocate ``[T, N]`` and fill rows ``[0, r1)``. It runs
    last; the other pieces run first into temporaries that are then copied into their rows
    (``3/4`` of the output bytes at group size 4). Single-expert pieces run as
    ``torch.mm(..., out=rows)``, in place. Weights are never merged.
``segments_async``
    As ``segments``, but the pieces other than the first run on up to 4 worker streams, each
    piece's GEMM followed by its copy (copy engine) on its worker, concurrently with the first
    piece's GEMM on the current stream; the current stream waits for the workers before the call
    returns. The default for fp8 split weights on CUDA. Measured on an H200 (bf16, DeepSeek-V3
    shapes, 4 pieces, ``docs/benchmarks.md``): gate-up 0.985-0.995x the contiguous call, down
    0.933-0.949x: the result copies (2.6 ms for 3/4 of a 7.5 GB down result) cost, under the
    power cap.
``segments_direct`` (the default for bf16 / float32 split weights on CUDA)
    The first piece in place as above; in the other pieces, every expert with at least
    ``direct_min_rows`` rows (an argument, default
    :data:`DIRECT_MIN_ROWS`) runs as ``torch.mm(x_rows, w_e, out=out_rows)`` straight into
    the output, and each run of smaller experts as one grouped call into a temporary, then a
    copy. The units are cut into up to 4 contiguous chunks of about equal rows, one per worker
    stream. Measured on an H200 (same benchmark): 1.02-1.09x the contiguous ``torch._grouped_mm``
    from 8K to 64K tokens (cuBLAS's per-expert GEMMs outrun the CUTLASS grouped kernel at these
    sizes, and no result is copied); at 1K tokens (32 rows per expert: nearly everything grouped)
    about equal to ``segments_async``. Host cost: one ``torch.mm`` launch per big expert (about
    19 us each on that machine, 3.6 ms for 192 experts): fine behind GEMMs of milliseconds, but
    pass a larger ``direct_min_rows`` where the host is the bottleneck. fp8 runs as
    ``segments_async``: ``torch._scaled_mm`` with row-wise scales (cuBLASLt) refused row counts
    that are not multiples of 16.
``per_expert``
    ``torch.mm(x_rows, w_e, out=out_rows)`` for every expert with tokens. Also the fallback for
    pieces whose strides or alignment ``torch._grouped_mm`` rejects (its operands need 16-byte
    aligned strides and base pointers), for dtypes it lacks on the device, and for old torch.
    On CUDA, ``"auto"`` takes it wherever ``torch._grouped_mm`` has no kernel of its own (float32;
    bf16 below sm90,
    :func:`~dwdp_comm.kernels.capabilities.has_device_kernel`): torch's fallback there is the same loop of ``mm``
    after a device-to-host copy of ``offs``, i.e. a sync this loop avoids (the row ranges are
    already on the host).

Why split weights cannot be one call: ``torch._grouped_mm`` takes one ``[E, K, N]`` tensor with a
single expert stride; pieces in separate allocations have no such stride. A composite view (one
virtual range mapped onto the pieces' physical pages, CUDA VMM; :meth:`PrefetchHandle.weights`)
gives them one, and then the single call above runs with no copy at all. Issuing the pieces back
to back costs only the temporaries' copies (at K=2048, N=7168 about 10 % of the GEMM time for
3/4 of the rows; at K=7168 a few tenths of that), which ``segments_async`` spreads over
concurrent pieces on worker streams and ``segments_direct`` avoids for every expert big enough
to be worth its own ``torch.mm``.

What each call costs besides the GEMMs (see :class:`~dwdp_comm.kernels.token_groups.TokenGroups` for the
token counts' forms):
no host synchronisation, no dtype conversion, no contiguity copy. The result is the op's own
allocation, except with a caller's ``out=``, which costs one device copy of the result (of every
piece's rows on split weights; leave ``out`` None for speed).

fp8 (e4m3) weights run through ``torch._scaled_grouped_mm`` (``grouped_mm`` or ``segments``;
x is quantized per row, weights carry per-output-channel float32 scales and must be K-contiguous:
store ``[E, N, K]`` and pass ``w.transpose(-1, -2)``). Where that op is missing (CPU builds, GPUs
below sm90) :func:`~dwdp_comm.kernels.capabilities.fp8_unavailable_reason` says why.

Streams: everything is enqueued on the current stream of ``x``'s device (plus the worker streams
of ``segments_async`` / ``segments_direct`` and :func:`run_rows`, forked from it and joined back
before returning); the host never waits, except once per device and dtype for a tiny capability
probe.
"""

from __future__ import annotations

import torch

from ..errors import BackendUnavailableError, bad_arg
from ..checks import check_int
from .capabilities import (fp8_operand_ok, fp8_unavailable_reason, grouped_mm_supported,
                           grouped_mm_unavailable_reason, has_device_kernel, operand_ok)
from .problem import Problem
from .reference import quantize_rowwise
from .segments import new_output, per_expert, piece_bounds, run_segments
from .workers import WorkerStreams

__all__ = ["run", "run_rows", "choose_method", "split_strategy", "check_direct_min_rows", "METHODS",
           "SPLIT_STRATEGIES", "DIRECT_MIN_ROWS"]

METHODS = ("auto", "grouped_mm", "segments", "segments_async", "segments_direct", "per_expert")
SPLIT_STRATEGIES = ("direct", "async", "serial")

#: Default of ``direct_min_rows`` (``segments_direct``): experts with at least this many rows
#: (outside the in-place piece) run as ``torch.mm`` straight into the output; smaller ones stay
#: grouped (temporary + copy). 128: on an H200 (``perf/probe_split_gemm.py``) 0 and 128 ran alike
#: from 4K tokens up, while 0 made 1K tokens host-bound (one launch per expert: 0.86x) and 512
#: lost to whole pieces at 8K (0.94x). A default only: pass ``direct_min_rows=`` to change it.
DIRECT_MIN_ROWS = 128

_SPLIT_METHODS = ("segments", "segments_async", "segments_direct")


def check_direct_min_rows(value) -> int:
    """``value`` as an int >= 0, or InvalidArgumentError naming ``direct_min_rows``."""
    return check_int("direct_min_rows", value, low=0,
                     expected="an int >= 0 (rows from which an expert runs its own torch.mm)")


def split_strategy(method: str, device, *, fp8: bool = False) -> str:
    """How the torch path runs split weights (several pieces) for ``method`` on ``device``.

    Parameters
    ----------
    method : str
        One of :data:`METHODS` (``"grouped_mm"`` and ``"per_expert"`` answer ``"serial"``).
    device : torch.device or str
    fp8 : bool
        fp8 weights (never ``"direct"``: ``torch._scaled_mm`` refuses many row counts).

    Returns
    -------
    str
        ``"direct"`` (``segments_direct``: big experts written in place, the rest grouped, on
        worker streams), ``"async"`` (whole pieces on worker streams, their results copied) or
        ``"serial"`` (whole pieces in order on the current stream). Worker streams exist on CUDA
        only: elsewhere ``"direct"`` / ``"async"`` run in order too.
    """
    if method not in METHODS:
        raise bad_arg("method", method, f"one of {METHODS}")
    device = torch.device(device)
    overlap = method in ("segments_async", "segments_direct") or (method == "auto" and device.type == "cuda")
    if not overlap:
        return "serial"
    return "direct" if not fp8 and method in ("auto", "segments_direct") else "async"


def choose_method(p: Problem, method: str = "auto", info: dict | None = None) -> str:
    """The method :func:`run` runs for ``p`` (what it reports as ``info["method"]``).

    Parameters
    ----------
    p : Problem
    method : str
        One of :data:`METHODS`; ``"auto"``: ``grouped_mm`` for one piece; for several,
        ``segments_direct`` on CUDA (fp8: ``segments_async``) and ``segments`` elsewhere;
        ``per_expert`` where ``torch._grouped_mm`` cannot run or has no kernel of its own.
    info : dict, optional
        Receives ``fallback`` (why) when the choice differs from what ``method`` asked for.

    Returns
    -------
    str
        ``"empty"``, ``"grouped_mm"``, ``"segments"``, ``"segments_async"``, ``"segments_direct"``,
        ``"per_expert"``, or for fp8 ``"scaled_grouped_mm"``, ``"scaled_segments"``,
        ``"scaled_segments_async"``.

    Raises
    ------
    InvalidArgumentError
        An unknown method, or ``grouped_mm`` for several pieces.
    BackendUnavailableError
        fp8 weights where ``torch._scaled_grouped_mm`` cannot run, or a forced method that cannot.

    Notes
    -----
    Host only, no device work, except the first capability probe per device and dtype
    (:mod:`dwdp_comm.kernels.capabilities`).
    """
    if method not in METHODS:
        raise bad_arg("method", method, f"one of {METHODS}")
    info = {} if info is None else info
    if p.num_tokens == 0:
        return "empty"
    several = len(p.pieces) != 1
    if p.is_fp8:
        why = fp8_unavailable_reason(p.device)
        if why:
            raise BackendUnavailableError(f"fp8 weights: {why}; use backend='reference' (slow) or bf16 weights")
        if method == "per_expert":
            raise BackendUnavailableError("method='per_expert' does not support fp8 weights")
        if method == "grouped_mm" and several:
            raise bad_arg("method", method, f"'segments' for {len(p.pieces)} weight pieces")
        if not several:
            return "scaled_grouped_mm"
        return "scaled_segments" if split_strategy(method, p.device, fp8=True) == "serial" else "scaled_segments_async"
    why = grouped_mm_unavailable_reason(p.device, p.x.dtype)
    if method == "per_expert" or why:
        if why:
            if method in ("grouped_mm",) + _SPLIT_METHODS:
                raise BackendUnavailableError(f"method={method!r}: {why}")
            info["fallback"] = why
        return "per_expert"
    if method == "grouped_mm" and several:
        raise bad_arg("method", method, f"'segments' or 'per_expert' for {len(p.pieces)} weight pieces "
                      "(grouped_mm needs one [E, K, N] tensor)")
    if method == "auto" and not has_device_kernel(p.device, p.x.dtype):
        info["fallback"] = (f"torch._grouped_mm has no {p.x.dtype} kernel on this GPU (its fallback copies the "
                            "offsets to the host, a sync, then loops over groups): per-expert torch.mm instead")
        return "per_expert"
    if not operand_ok(p.x):
        info["fallback"] = f"x strides {p.x.stride()} / alignment rejected by torch._grouped_mm"
        return "per_expert"
    if not several:
        return "grouped_mm"
    return {"direct": "segments_direct", "async": "segments_async", "serial": "segments"}[
        split_strategy(method, p.device)]


def run(p: Problem, method: str = "auto", info: dict | None = None, *,
        direct_min_rows: int = DIRECT_MIN_ROWS) -> torch.Tensor:
    """Run ``p`` with torch ops; see the module docstring for the methods.

    Parameters
    ----------
    p : Problem
    method : str
        One of :data:`METHODS` (:func:`choose_method` says what ``"auto"`` becomes).
    info : dict, optional
        Receives ``method`` (what ran), for split weights ``streams`` (worker streams used, 0
        when all ran on the current stream) and, where a fallback happened, ``fallback`` (why).
    direct_min_rows : int
        ``segments_direct`` only: experts with at least this many rows (outside the in-place
        piece) run as their own ``torch.mm`` into the output; default :data:`DIRECT_MIN_ROWS`.

    Returns
    -------
    torch.Tensor
        ``[T, N]`` in ``x``'s dtype, bf16 for fp8 weights (``p.out`` when given), ready on the
        current stream.

    Raises
    ------
    BackendUnavailableError, InvalidArgumentError
        As :func:`choose_method`; a bad ``direct_min_rows``.
    """
    direct_min_rows = check_direct_min_rows(direct_min_rows)
    info = {} if info is None else info
    chosen = choose_method(p, method, info)
    info["method"] = chosen
    if chosen == "empty":
        return p.out if p.out is not None else p.x.new_empty(0, p.N)
    if chosen.startswith("scaled_"):
        return _run_fp8(p, info, overlap=chosen == "scaled_segments_async")
    if chosen == "per_expert":
        return per_expert(p, new_output(p))
    if chosen == "grouped_mm":
        w = p.pieces[0][1]
        if operand_ok(w):  # the fast path: exactly one torch._grouped_mm, nothing else on the device
            y = torch._grouped_mm(p.x, w, offs=p.groups.device_offsets(p.device))
            if p.out is None:
                return y
            p.out.copy_(y)  # torch._grouped_mm has no out=: the caller's buffer costs one copy
            return p.out
        return run_segments(p, info)  # one piece: per-expert torch.mm for its rejected strides
    return run_segments(p, info, overlap=chosen != "segments",
                        direct_min_rows=direct_min_rows if chosen == "segments_direct" else None)


def _run_fp8(p: Problem, info: dict, overlap: bool) -> torch.Tensor:
    xq, xs = (p.x, p.x_scales) if p.x_scales is not None else quantize_rowwise(p.x)
    piece_of = {first: pi for pi, (first, _) in enumerate(p.pieces)}  # fp8 units are whole pieces

    def mm(a, w, offs, first, r0):
        return torch._scaled_grouped_mm(a, w, xs[r0:r0 + a.shape[0]], p.scales[piece_of[first]], offs=offs,
                                        out_dtype=torch.bfloat16)

    # No direct units for fp8: torch._scaled_mm with row-wise scales (cuBLASLt, torch 2.11 + CUDA
    # 13 on an H200) refused row counts that are not multiples of 16 (CUBLAS_STATUS_NOT_SUPPORTED,
    # e.g. m=237): fp8 pieces stay whole grouped calls (segments_direct runs as segments_async).
    return run_segments(p, info, mm=mm, xq=xq, overlap=overlap)


def run_rows(p: Problem, consume, info: dict | None = None, overlap: bool | None = None) -> None:
    """Compute ``p`` piece by piece and hand each piece's rows to ``consume`` (no assembly copy).

    ``consume(r0, r1, y)`` receives ``y`` = rows ``[r0, r1)`` of the result (``[r1 - r0, N]``,
    x's dtype), in row order on the host; pieces without tokens are skipped. Used by
    :func:`dwdp_comm.kernels.moe_mlp` to apply SwiGLU straight from each piece's gate-up result.

    Streams: with ``overlap`` (default: on CUDA) each piece's GEMM and ``consume`` are enqueued
    on a worker stream (:class:`~dwdp_comm.kernels.workers.WorkerStreams`: pieces run
    concurrently), forked from the current stream before the first piece and joined back before
    returning; ``consume`` must enqueue its
    work on the stream current when it is called and write only rows ``[r0, r1)`` of buffers
    allocated before the call. ``y`` belongs to the worker stream's pool: use it
    inside ``consume`` only (keep a copy, not ``y``, for later use on other streams). Without
    ``overlap``, everything runs on the current stream.
    """
    info = {} if info is None else info
    if p.is_fp8:
        why = fp8_unavailable_reason(p.device)
        if why:
            raise BackendUnavailableError(f"fp8 weights: {why}")
        xq, xs = (p.x, p.x_scales) if p.x_scales is not None else quantize_rowwise(p.x)
        x, fp8 = xq, True
    else:
        x, fp8 = p.x, False
        xs = None
    grouped = fp8 or (grouped_mm_supported(p.device, p.x.dtype) and has_device_kernel(p.device, p.x.dtype)
                      and operand_ok(p.x))
    info["method"] = "scaled_rows" if fp8 else ("grouped_mm_rows" if grouped else "per_expert_rows")
    g = p.groups
    bounds = piece_bounds(p)
    offs = g.piece_offsets(p.device, bounds) if grouped else None
    if overlap is None:
        overlap = p.device.type == "cuda"
    workers = WorkerStreams(p.device, len(p.pieces), overlap)
    info["streams"] = len(workers.streams)
    workers.fork()
    try:
        for pi, (first, w) in enumerate(p.pieces):
            n = bounds[pi][1]
            r0, r1 = g.rows(first, first + n)
            if r1 == r0:
                continue
            with workers.on(pi):
                _run_piece_rows(p, consume, pi, first, w, n, r0, r1, x, xs, fp8, grouped, offs)
    finally:
        workers.join()  # also after an error: nothing later on the current stream races the workers


def _run_piece_rows(p, consume, pi, first, w, n, r0, r1, x, xs, fp8, grouped, offs) -> None:
    """One piece of :func:`run_rows`: its GEMM on rows ``[r0, r1)``, then ``consume``."""
    if fp8:
        if not fp8_operand_ok(w):
            raise BackendUnavailableError("fp8 weights must be K-contiguous: store [E, N, K], pass "
                                          "w.transpose(-1, -2)")
        y = torch._scaled_grouped_mm(x[r0:r1], w, xs[r0:r1], p.scales[pi], offs=offs[pi],
                                     out_dtype=torch.bfloat16)
    elif grouped and operand_ok(w):
        y = torch._grouped_mm(x[r0:r1], w, offs=offs[pi])
    else:
        g = p.groups
        y = torch.empty(r1 - r0, p.N, dtype=p.out_dtype, device=p.device)
        for i in range(n):
            a, b = int(g.starts[first + i]) - r0, int(g.ends[first + i]) - r0
            if b > a:
                torch.mm(x[r0 + a:r0 + b], w[i], out=y[a:b])
    consume(r0, r1, y)
