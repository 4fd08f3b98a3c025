"""Torch fast path: ``torch._grouped_mm`` / ``torch._scaled_grouped_mm`` over weight pieces.

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
    :data:`DIRECT_MIN_ROWS` rows runs as ``torch.mm(x_rows, w_e, out=out_rows)`` straight into
    the output, and each run of smaller experts as one grouped call into a temporary, then a
    copy. The units are cut into up to 4 contiguous chunks of about equal rows, one per worker
    stream. Measured on an H200 (same benchmark): 1.02-1.09x the contiguous ``torch._grouped_mm``
    from 8K to 64K tokens (cuBLAS's per-expert GEMMs outrun the CUTLASS grouped kernel at these
    sizes, and no result is copied); at 1K tokens (32 rows per expert: nearly everything grouped)
    about equal to ``segments_async``. Host cost: one ``torch.mm`` launch per big expert (about
    19 us each on that machine, 3.6 ms for 192 experts): fine behind GEMMs of milliseconds, but
    raise :data:`DIRECT_MIN_ROWS` where the host is the bottleneck. fp8 runs as
    ``segments_async``: ``torch._scaled_mm`` with row-wise scales (cuBLASLt) refused row counts
    that are not multiples of 16.
``per_expert``
    ``torch.mm(x_rows, w_e, out=out_rows)`` for every expert with tokens. Also the fallback for
    pieces whose strides or alignment ``torch._grouped_mm`` rejects (its operands need 16-byte
    aligned strides and base pointers), for dtypes it lacks on the device, and for old torch.
    On CUDA, ``"auto"`` takes it wherever ``torch._grouped_mm`` has no kernel of its own (float32;
    bf16 below sm90, :func:`has_device_kernel`): torch's fallback there is the same loop of ``mm``
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

What each call costs besides the GEMMs (see :class:`TokenGroups` for the token counts' forms):
no host synchronisation, no dtype conversion, no contiguity copy. The result is the op's own
allocation, except with a caller's ``out=``, which costs one device copy of the result (of every
piece's rows on split weights; leave ``out`` None for speed).

fp8 (e4m3) weights run through ``torch._scaled_grouped_mm`` (``grouped_mm`` or ``segments``;
x is quantized per row, weights carry per-output-channel float32 scales and must be K-contiguous:
store ``[E, N, K]`` and pass ``w.transpose(-1, -2)``). Where that op is missing (CPU builds, GPUs
below sm90) :func:`fp8_unavailable_reason` says why.

Streams: everything is enqueued on the current stream of ``x``'s device (plus the worker streams
of ``segments_async`` / ``segments_direct`` and :func:`run_rows`, forked from it and joined back
before returning); the host never waits, except once per device and dtype for a tiny capability
probe.
"""

from __future__ import annotations

import collections
import contextlib
import functools

import torch

from ..errors import BackendUnavailableError, bad_arg
from ._inputs import FP8_DTYPE, Problem
from .reference import quantize_rowwise

__all__ = ["run", "run_rows", "WorkerStreams", "METHODS", "DIRECT_MIN_ROWS", "grouped_mm_supported", "has_device_kernel", "fp8_unavailable_reason",
           "operand_ok"]

METHODS = ("auto", "grouped_mm", "segments", "segments_async", "segments_direct", "per_expert")

#: ``segments_direct``: experts with at least this many rows (outside the in-place piece) run as
#: ``torch.mm`` straight into the output; smaller ones stay grouped (temporary + copy). 128: on an
#: H200 (``perf/probe_split_gemm.py``) 0 and 128 ran alike from 4K tokens up, while 0 made 1K
#: tokens host-bound (one launch per expert: 0.86x) and 512 lost to whole pieces at 8K (0.94x).
DIRECT_MIN_ROWS = 128


@functools.lru_cache(maxsize=None)
def _probe(device_type: str, index: int | None, dtype: torch.dtype) -> str | None:
    """None when ``torch._grouped_mm`` runs for ``dtype`` on the device, else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    dev = torch.device(device_type, index) if index is not None else torch.device(device_type)
    try:
        a = torch.ones(16, 16, dtype=dtype, device=dev)
        b = torch.ones(2, 16, 16, dtype=dtype, device=dev)
        offs = torch.tensor([8, 16], dtype=torch.int32, device=dev)
        y = torch._grouped_mm(a, b, offs=offs)
        if device_type != "meta" and float(y[0, 0]) != 16.0:  # meta: shapes only (tracing, tests)
            return "torch._grouped_mm returned a wrong value on a probe"
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"torch._grouped_mm({dtype}) fails on {device_type}: {str(exc).splitlines()[0][:200]}"
    return None


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int | None) -> tuple:
    return torch.cuda.get_device_capability(index)


def has_device_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """True unless ``torch._grouped_mm`` would take torch's own fallback on this CUDA device.

    On CUDA, torch runs its CUTLASS grouped kernel for bf16 on sm90 / sm100 only; every other
    case (float32, older GPUs) goes through a fallback that copies ``offs`` to the host (a sync)
    and then runs one ``mm`` per group: :func:`run` prefers its own per-expert loop there, the
    same work without the sync. Other device types (CPU, meta) have no sync to avoid: True.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return dtype == torch.bfloat16 and _cuda_capability(device.index)[0] in (9, 10)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True when ``torch._grouped_mm`` runs for ``dtype`` on ``device`` (probed once, cached)."""
    device = torch.device(device)
    return _probe(device.type, device.index, dtype) is None


@functools.lru_cache(maxsize=None)
def _fp8_probe(device_type: str, index: int | None) -> str | None:
    if not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    if device_type != "cuda":
        return f"torch._scaled_grouped_mm has no {device_type} kernel (CUDA sm90+ only)"
    dev = torch.device(device_type, index)
    try:
        a = torch.ones(32, 32, device=dev).to(FP8_DTYPE)
        b = torch.ones(2, 32, 32, device=dev).to(FP8_DTYPE).transpose(-1, -2)
        y = torch._scaled_grouped_mm(a, b, torch.ones(32, device=dev), torch.ones(2, 32, device=dev),
                                     offs=torch.tensor([16, 32], dtype=torch.int32, device=dev),
                                     out_dtype=torch.bfloat16)
        if float(y[0, 0]) != 32.0:
            return "torch._scaled_grouped_mm returned a wrong value on a probe"
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"torch._scaled_grouped_mm fails on {dev}: {str(exc).splitlines()[0][:200]}"
    return None


def fp8_unavailable_reason(device: torch.device) -> str | None:
    """None when fp8 grouped GEMM (``torch._scaled_grouped_mm``) runs on ``device``, else why not."""
    device = torch.device(device)
    return _fp8_probe(device.type, device.index if device.type == "cuda" else None)


def operand_ok(t: torch.Tensor) -> bool:
    """True when ``t`` meets ``torch._grouped_mm``'s layout rules (16-byte strides and base)."""
    if t.numel() == 0:
        return True
    align = 16 // t.element_size()
    s, sh = t.stride(), t.shape
    if t.data_ptr() % 16:
        return False
    if s[-1] == 1 and s[-2] >= max(1, sh[-1]):
        lead = s[-2]
    elif s[-2] == 1 and s[-1] >= max(1, sh[-2]):
        lead = s[-1]
    else:
        return False
    if lead % align:
        return False
    return t.dim() == 2 or s[0] % align == 0 or sh[0] == 1


def _fp8_ok(w: torch.Tensor) -> bool:
    s = w.stride()
    return s[-2] == 1 and s[-1] > 1 and operand_ok(w)


def run(p: Problem, method: str = "auto", info: dict | None = None) -> torch.Tensor:
    """Run ``p`` with torch ops; see the module docstring for the methods.

    Parameters
    ----------
    p : Problem
    method : str
        One of :data:`METHODS`. ``"auto"``: ``grouped_mm`` for one piece; for several,
        ``segments_direct`` on CUDA (fp8: ``segments_async``) and ``segments`` elsewhere;
        ``per_expert`` where ``torch._grouped_mm`` cannot run.
    info : dict, optional
        Receives ``method`` (what ran), for split weights ``streams`` (worker streams used, 0
        when all ran on the current stream) and, where a fallback happened, ``fallback`` (why).

    Returns
    -------
    torch.Tensor
        ``[T, N]`` in ``x``'s dtype (``p.out`` when given).

    Raises
    ------
    BackendUnavailableError
        fp8 weights where ``torch._scaled_grouped_mm`` cannot run, or a forced method that cannot.
    """
    if method not in METHODS:
        raise bad_arg("method", method, f"one of {METHODS}")
    info = {} if info is None else info
    if p.num_tokens == 0:
        info["method"] = "empty"
        return p.out if p.out is not None else p.x.new_empty(0, p.N)
    if p.is_fp8:
        return _run_fp8(p, method, info)
    can_group = grouped_mm_supported(p.device, p.x.dtype)
    if method == "per_expert" or not can_group:
        if not can_group:
            if method in ("grouped_mm", "segments", "segments_async", "segments_direct"):
                raise BackendUnavailableError(f"method={method!r}: {_probe_reason(p)}")
            info["fallback"] = _probe_reason(p)
        info["method"] = "per_expert"
        return _per_expert(p, _output(p))
    if method == "grouped_mm" and len(p.pieces) != 1:
        raise bad_arg("method", method, f"'segments' or 'per_expert' for {len(p.pieces)} weight pieces "
                      "(grouped_mm needs one [E, K, N] tensor)")
    if method == "auto" and not has_device_kernel(p.device, p.x.dtype):
        info["fallback"] = (f"torch._grouped_mm has no {p.x.dtype} kernel on this GPU (its fallback copies the "
                            "offsets to the host, a sync, then loops over groups): per-expert torch.mm instead")
        info["method"] = "per_expert"
        return _per_expert(p, _output(p))
    if not operand_ok(p.x):
        info["fallback"] = f"x strides {p.x.stride()} / alignment rejected by torch._grouped_mm"
        info["method"] = "per_expert"
        return _per_expert(p, _output(p))
    if len(p.pieces) == 1:
        info["method"] = "grouped_mm"
        w = p.pieces[0][1]
        if operand_ok(w):  # the fast path: exactly one torch._grouped_mm, nothing else on the device
            y = torch._grouped_mm(p.x, w, offs=p.groups.device_offsets(p.device))
            if p.out is None:
                return y
            p.out.copy_(y)  # torch._grouped_mm has no out=: the caller's buffer costs one copy
            return p.out
    overlap = _overlap(method, p.device)
    direct = _direct_min_rows(method, p.device)
    if len(p.pieces) > 1:
        info["method"] = "segments_direct" if direct is not None else ("segments_async" if overlap else "segments")
    return _segments(p, info, overlap=overlap, direct_min_rows=direct)


def _overlap(method: str, device: torch.device) -> bool:
    return method in ("segments_async", "segments_direct") or (method == "auto" and device.type == "cuda")


def _direct_min_rows(method: str, device: torch.device, fp8: bool = False) -> int | None:
    """DIRECT_MIN_ROWS for ``segments_direct`` (``auto`` on CUDA), else None (whole pieces; fp8)."""
    direct = not fp8 and method in ("auto", "segments_direct") and _overlap(method, device)
    return DIRECT_MIN_ROWS if direct else None


def run_rows(p: Problem, consume, info: dict | None = None, overlap: bool | None = None) -> None:
    """Compute ``p`` piece by piece and hand each piece's rows to ``consume`` (no assembly copy).

    ``consume(r0, r1, y)`` receives ``y`` = rows ``[r0, r1)`` of the result (``[r1 - r0, N]``,
    x's dtype), in row order on the host; pieces without tokens are skipped. Used by
    :func:`dwdp_comm.kernels.moe_mlp` to apply SwiGLU straight from each piece's gate-up result.

    Streams: with ``overlap`` (default: on CUDA) each piece's GEMM and ``consume`` are enqueued
    on a worker stream (:class:`_Workers`: pieces run concurrently), forked from the current
    stream before the first piece and joined back before returning; ``consume`` must enqueue its
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
    bounds = _bounds(p)
    offs = g.piece_offsets(p.device, bounds) if grouped else None
    if overlap is None:
        overlap = p.device.type == "cuda"
    workers = _Workers(p.device, len(p.pieces), overlap)
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
        if not _fp8_ok(w):
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


def _probe_reason(p: Problem) -> str:
    d = p.device
    return _probe(d.type, d.index, p.x.dtype) or ""


def _output(p: Problem) -> torch.Tensor:
    return p.out if p.out is not None else torch.empty(p.num_tokens, p.N, dtype=p.out_dtype, device=p.device)


def _bounds(p: Problem) -> tuple:
    return tuple((first, int(w.shape[0])) for first, w in p.pieces)


class WorkerStreams:
    """Worker streams for the pieces of a split GEMM (a pool per caller stream, reused), or none.

    Work is cut into units (a piece, a run of experts, one expert: ``segments_async`` /
    ``segments_direct``) and the units into contiguous chunks, chunk ``j`` on worker ``j``: each
    unit's grouped GEMM then the copy of its result into the output (a D2D ``cudaMemcpyAsync``:
    the copy engine), or its ``torch.mm`` into the output rows; :func:`run_rows` puts piece ``j``
    on worker ``j mod n``, its GEMM then ``consume``.
    Pieces on different workers run at the same time, so one kernel's tail fills with the next
    one's tiles, and each copy overlaps other pieces' GEMMs instead of piling up behind the last.

    Ordering: :meth:`fork` makes every worker wait for what the current stream has enqueued so
    far (x, scales, offsets, the caller's ``out``, and the earlier users of any block the current
    stream hands out after the fork); :meth:`join` makes the current stream wait for every
    worker, so the result is ready on the current stream as if all had run there. Memory: a
    piece's temporary is allocated on its worker stream and freed after its copy was enqueued
    there, so its block is reused only after that copy (no ``record_stream``); the block stays
    cached in that worker's pool. The output, allocated on the current stream after the fork, is
    written by the workers on rows the current stream's GEMM does not touch; its block's earlier
    users were enqueued before the fork.

    Pools: one per (device, caller stream), its workers created at the caller stream's priority,
    so split GEMMs issued from two streams do not queue behind each other's pieces and a
    high-priority caller keeps its priority. At most :attr:`POOLS` pools are kept (least
    recently used dropped; torch hands its streams out of a fixed per-device pool, so dropping
    one frees nothing and in-flight work is unaffected).
    """

    MAX = 4  # concurrent pieces: enough to fill the tails; more only adds streams
    POOLS = 8
    _pools: "collections.OrderedDict" = collections.OrderedDict()

    def __init__(self, device: torch.device, pieces: int, overlap: bool):
        self.main, self.streams = None, []
        if overlap and device.type == "cuda" and pieces > 0:
            self.main = torch.cuda.current_stream(device)
            key = (self.main.device_index, self.main.stream_id)
            pool = self._pools.pop(key, [])
            self._pools[key] = pool  # most recently used last
            while len(self._pools) > self.POOLS:
                self._pools.popitem(last=False)
            while len(pool) < min(pieces, self.MAX):
                pool.append(torch.cuda.Stream(device=self.main.device_index, priority=self.main.priority))
            self.streams = pool[:min(pieces, self.MAX)]

    def fork(self) -> None:
        for st in self.streams:
            st.wait_stream(self.main)

    def on(self, j: int):
        """Context: work enqueued inside runs on piece ``j``'s worker (or the current stream)."""
        return torch.cuda.stream(self.streams[j % len(self.streams)]) if self.streams else contextlib.nullcontext()

    def join(self) -> None:
        for st in self.streams:
            self.main.wait_stream(st)


_Workers = WorkerStreams  # the name used inside this module


def _segments(p: Problem, info: dict, mm=None, xq=None, overlap: bool = False,
              direct_min_rows: int | None = None) -> torch.Tensor:
    """One grouped call per piece, every result landing in one ``[T, N]`` output.

    ``torch._grouped_mm`` has no ``out=``, so only one piece can be computed in place: the first
    one, run on the whole of ``x`` with only its own groups, makes the op allocate ``[T, N]`` and
    fill rows ``[0, r1)``. The other pieces' GEMMs write temporaries that are copied into their
    rows. With ``overlap`` (CUDA), those pieces run on worker streams (:class:`_Workers`) while the
    first one runs on the current stream (with a caller's ``out``, or when the first piece cannot
    run in place, every grouped piece runs on a worker); without it, everything runs in order on
    the current stream. Single-expert pieces run as ``torch.mm(..., out=rows)``, in place. With a
    caller's ``out`` every grouped piece is copied.

    ``direct_min_rows`` (``segments_direct``): in the pieces that are not computed in place,
    every expert with at least that many rows runs as ``torch.mm(..., out=rows)`` straight into
    the output (no temporary, no copy); the runs of smaller experts between them stay grouped
    calls into temporaries. None: every such piece is one grouped call.

    ``mm(a, w, offs, first, r0)``: the grouped call on rows ``a`` (from row ``r0``) of experts
    ``first..first + len(w) - 1``.
    """
    fp8 = xq is not None
    mm = mm or (lambda a, w, offs, first, r0: torch._grouped_mm(a, w, offs=offs))
    x = p.x if xq is None else xq
    g = p.groups
    bounds = _bounds(p)
    plan, fallbacks = [], []
    for pi, (first, w) in enumerate(p.pieces):
        n = bounds[pi][1]
        r0, r1 = g.rows(first, first + n)
        ok = _fp8_ok(w) if fp8 else operand_ok(w)
        if not ok and fp8:
            raise BackendUnavailableError(
                f"fp8 weights (experts {first}..{first + n - 1}) with strides {tuple(w.stride())}: "
                "torch._scaled_grouped_mm needs K-contiguous weights; store them as [E, N, K] and pass "
                "w.transpose(-1, -2)")
        if not ok:
            fallbacks.append(f"experts {first}..{first + n - 1}: weight strides {tuple(w.stride())}")
        # single-expert pieces: torch.mm straight into the output rows (no temporary, no copy)
        plan.append((pi, first, w, r0, r1, "grouped" if ok and (fp8 or n > 1) else "direct"))
    out = p.out
    first_in_place = out is None and plan[0][5] == "grouped" and plan[0][4] > 0
    if out is None and not first_in_place:
        out = torch.empty(p.num_tokens, p.N, dtype=p.out_dtype, device=p.device)
    # units of work besides the in-place piece: ("run", first, count, w, r0, r1) grouped calls into
    # temporaries, ("mm", expert, w_e, r0, r1) straight into the output
    units = []
    for pi, first, w, r0, r1, kind in plan:
        if kind != "grouped" or r1 == r0 or (pi == 0 and first_in_place):
            continue
        if direct_min_rows is None:
            units.append(("run", first, int(w.shape[0]), w, r0, r1))
        else:
            units.extend(_split_piece(g, first, w, direct_min_rows))
    keys = ((bounds[0],) if first_in_place else ()) + tuple((u[1], u[2]) for u in units if u[0] == "run")
    run_offs = dict(zip(keys, g.piece_offsets(p.device, keys))) if keys else {}  # one upload
    offs0 = run_offs.get(bounds[0])
    workers = _Workers(p.device, len(units), overlap)
    info["streams"] = len(workers.streams)
    workers.fork()
    try:
        if first_in_place and any(u[0] == "mm" for u in units):
            # direct writes need the output first. Safe only because nothing is enqueued on the
            # current stream between fork() and this allocation (see _Workers)
            out = mm(x, plan[0][2], offs0, 0, 0)  # whole x, piece 0's groups: [T, N], rows [0, r1) filled
        pending = {}
        # one contiguous chunk of units per worker: one stream switch each (host time), balanced rows
        for j, chunk in enumerate(_chunks(units, max(1, len(workers.streams)))):
            with workers.on(j):
                for u in chunk:
                    if u[0] == "mm":
                        _, e, we, r0, r1 = u
                        torch.mm(x[r0:r1], we, out=out[r0:r1])
                        continue
                    _, first, n, w, r0, r1 = u
                    y = mm(x[r0:r1], w, run_offs[(first, n)], first, r0)
                    if out is not None:
                        out[r0:r1].copy_(y)
                    else:
                        pending.setdefault(j, []).append((r0, r1, y))
        if out is None:
            # Safe only because nothing is enqueued on the current stream between fork() and this
            # allocation: the workers write into this block without waiting for the current stream.
            out = mm(x, plan[0][2], offs0, 0, 0)  # whole x, piece 0's groups: [T, N], rows [0, r1) filled
            for j, copies in pending.items():
                with workers.on(j):
                    for r0, r1, y in copies:
                        out[r0:r1].copy_(y)  # rows disjoint from what the GEMM writes
        for pi, first, w, r0, r1, kind in plan:
            if kind == "direct" and r1 > r0:
                _per_expert_piece(p, out, first, w)
    finally:
        workers.join()
    if fallbacks:
        info["fallback"] = "per-expert torch.mm for " + "; ".join(fallbacks)
    return out


def _chunks(units: list, n: int) -> list:
    """``units`` cut into at most ``n`` contiguous chunks of about equal rows (last two fields)."""
    if len(units) <= n:
        return [[u] for u in units]
    total = sum(u[-1] - u[-2] for u in units)
    chunks, cur, done = [], [], 0
    for u in units:
        cur.append(u)
        done += u[-1] - u[-2]
        if done * n >= total * (len(chunks) + 1) and len(chunks) < n - 1:
            chunks.append(cur)
            cur = []
    if cur:
        chunks.append(cur)
    return chunks


def _split_piece(g, first: int, w: torch.Tensor, min_rows: int) -> list:
    """Units of one piece for ``segments_direct``: big experts direct, runs of small ones grouped.

    An expert with at least ``min_rows`` rows (and at least one) becomes ``("mm", e, w[i], r0,
    r1)``; each maximal run of the others becomes ``("run", first_expert, count, w[i0:i1], r0,
    r1)``, or a ``"mm"`` unit when only one of its experts has rows. Runs without rows are dropped.
    """
    starts, ends = g.starts, g.ends
    units, i0 = [], None

    def close(i1):
        if i0 is None:
            return
        r0, r1 = int(starts[first + i0]), int(ends[first + i1 - 1])
        busy = [i for i in range(i0, i1) if ends[first + i] > starts[first + i]]
        if len(busy) == 1:
            i = busy[0]
            units.append(("mm", first + i, w[i], int(starts[first + i]), int(ends[first + i])))
        elif busy:
            units.append(("run", first + i0, i1 - i0, w[i0:i1], r0, r1))

    for i in range(int(w.shape[0])):
        a, b = int(starts[first + i]), int(ends[first + i])
        if b > a and b - a >= min_rows:
            close(i)
            i0 = None
            units.append(("mm", first + i, w[i], a, b))
        elif i0 is None:
            i0 = i
    close(int(w.shape[0]))
    return units


def _per_expert_piece(p: Problem, out: torch.Tensor, first: int, w: torch.Tensor) -> None:
    g = p.groups
    for i in range(int(w.shape[0])):
        r0, r1 = int(g.starts[first + i]), int(g.ends[first + i])
        if r1 > r0:
            torch.mm(p.x[r0:r1], w[i], out=out[r0:r1])


def _per_expert(p: Problem, out: torch.Tensor) -> torch.Tensor:
    for first, w in p.pieces:
        _per_expert_piece(p, out, first, w)
    return out


def _run_fp8(p: Problem, method: str, info: dict) -> torch.Tensor:
    why = fp8_unavailable_reason(p.device)
    if why:
        raise BackendUnavailableError(f"fp8 weights: {why}; use backend='reference' (slow) or bf16 weights")
    if method == "per_expert":
        raise BackendUnavailableError("method='per_expert' does not support fp8 weights")
    if method == "grouped_mm" and len(p.pieces) != 1:
        raise bad_arg("method", method, f"'segments' for {len(p.pieces)} weight pieces")
    xq, xs = (p.x, p.x_scales) if p.x_scales is not None else quantize_rowwise(p.x)

    piece_of = {first: pi for pi, (first, _) in enumerate(p.pieces)}  # fp8 units are whole pieces

    def mm(a, w, offs, first, r0):
        return torch._scaled_grouped_mm(a, w, xs[r0:r0 + a.shape[0]], p.scales[piece_of[first]], offs=offs,
                                        out_dtype=torch.bfloat16)

    # No direct units for fp8: torch._scaled_mm with row-wise scales (cuBLASLt, torch 2.11 + CUDA
    # 13 on an H200) refused row counts that are not multiples of 16 (CUBLAS_STATUS_NOT_SUPPORTED,
    # e.g. m=237): fp8 pieces stay whole grouped calls (segments_direct runs as segments_async).
    overlap = _overlap(method, p.device)
    info["method"] = "scaled_grouped_mm" if len(p.pieces) == 1 else \
        ("scaled_segments_async" if overlap else "scaled_segments")
    return _segments(p, info, mm=mm, xq=xq, overlap=overlap)
