"""The segment engine of the torch path: split weights computed piece by piece into one output.

``torch._grouped_mm`` has no ``out=``, so only one piece can land in the result without a copy:
the first, run on the whole of ``x`` with only its own groups (the op allocates ``[T, N]`` and
fills rows ``[0, r1)``). :func:`run_segments` runs it last and the other pieces first, into
temporaries that are copied into their rows, or (``direct_min_rows``) as ``torch.mm(out=rows)``
per big expert, straight into the output; on CUDA those units run on worker streams
(:class:`~dwdp_comm.kernels.workers.WorkerStreams`). Which method runs when is decided by
:func:`dwdp_comm.kernels.torch_path.choose_method`.
"""

from __future__ import annotations

import torch

from ..errors import BackendUnavailableError
from .capabilities import fp8_operand_ok, operand_ok
from .problem import Problem
from .workers import WorkerStreams

__all__ = ["run_segments", "split_piece", "balanced_chunks", "per_expert", "per_expert_piece", "piece_bounds",
           "new_output"]


def new_output(p: Problem) -> torch.Tensor:
    """The caller's ``out``, else a fresh ``[T, N]`` result on the current stream."""
    return p.out if p.out is not None else torch.empty(p.num_tokens, p.N, dtype=p.out_dtype, device=p.device)


def piece_bounds(p: Problem) -> tuple:
    """``((first_expert, count), ...)`` of ``p``'s weight pieces (the key of their device offsets)."""
    return tuple((first, int(w.shape[0])) for first, w in p.pieces)


def run_segments(p: Problem, info: dict, mm=None, xq=None, overlap: bool = False,
              direct_min_rows: int | None = None) -> torch.Tensor:
    """One grouped call per piece, every result landing in one ``[T, N]`` output.

    ``torch._grouped_mm`` has no ``out=``, so only one piece can be computed in place: the first
    one, run on the whole of ``x`` with only its own groups, makes the op allocate ``[T, N]`` and
    fill rows ``[0, r1)``. The other pieces' GEMMs write temporaries that are copied into their
    rows. With ``overlap`` (CUDA), those pieces run on worker streams (:class:`WorkerStreams`) while the
    first one runs on the current stream (with a caller's ``out``, or when the first piece cannot
    run in place, every grouped piece runs on a worker); without it, everything runs in order on
    the current stream. Single-expert pieces run as ``torch.mm(..., out=rows)``, in place. With a
    caller's ``out`` every grouped piece is copied.

    ``direct_min_rows`` (``segments_direct``): in the pieces that are not computed in place,
    every expert with at least that many rows runs as ``torch.mm(..., out=rows)`` straight into
    the output (no temporary, no copy); the runs of smaller experts between them stay grouped
    calls into temporaries. None: every such piece is one grouped call.

    ``mm(a, w, offs, first, r0)``: the grouped call on rows ``a`` (from row ``r0``) of experts
    ``first..first + len(w) - 1`` (default ``torch._grouped_mm``); ``xq``: the quantized fp8 ``x``
    it reads instead of ``p.x`` (fp8 pieces must be K-contiguous). ``info`` receives ``streams``
    (workers used) and, where pieces fell back to per-expert ``torch.mm``, ``fallback``.
    Returns the ``[T, N]`` result (``p.out`` when given), ready on the current stream.
    """
    fp8 = xq is not None
    mm = mm or (lambda a, w, offs, first, r0: torch._grouped_mm(a, w, offs=offs))
    x = p.x if xq is None else xq
    g = p.groups
    bounds = piece_bounds(p)
    plan, fallbacks = [], []
    for pi, (first, w) in enumerate(p.pieces):
        n = bounds[pi][1]
        r0, r1 = g.rows(first, first + n)
        ok = fp8_operand_ok(w) if fp8 else operand_ok(w)
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
            units.extend(split_piece(g, first, w, direct_min_rows))
    keys = ((bounds[0],) if first_in_place else ()) + tuple((u[1], u[2]) for u in units if u[0] == "run")
    run_offs = dict(zip(keys, g.piece_offsets(p.device, keys))) if keys else {}  # one upload
    offs0 = run_offs.get(bounds[0])
    workers = WorkerStreams(p.device, len(units), overlap)
    info["streams"] = len(workers.streams)
    workers.fork()
    try:
        if first_in_place and any(u[0] == "mm" for u in units):
            # direct writes need the output first. Safe only because nothing is enqueued on the
            # current stream between fork() and this allocation (see WorkerStreams)
            out = mm(x, plan[0][2], offs0, 0, 0)  # whole x, piece 0's groups: [T, N], rows [0, r1) filled
        pending = {}
        # one contiguous chunk of units per worker: one stream switch each (host time), balanced rows
        for j, chunk in enumerate(balanced_chunks(units, max(1, len(workers.streams)))):
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
                per_expert_piece(p, out, first, w)
    finally:
        workers.join()
    if fallbacks:
        info["fallback"] = "per-expert torch.mm for " + "; ".join(fallbacks)
    return out


def balanced_chunks(units: list, n: int) -> list:
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


def split_piece(g, first: int, w: torch.Tensor, min_rows: int) -> list:
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


def per_expert_piece(p: Problem, out: torch.Tensor, first: int, w: torch.Tensor) -> None:
    """``torch.mm(x_rows, w[i], out=out_rows)`` for every expert of the piece ``(first, w)`` with rows
    (current stream; the row ranges are on the host, so no sync)."""
    g = p.groups
    for i in range(int(w.shape[0])):
        r0, r1 = int(g.starts[first + i]), int(g.ends[first + i])
        if r1 > r0:
            torch.mm(p.x[r0:r1], w[i], out=out[r0:r1])


def per_expert(p: Problem, out: torch.Tensor) -> torch.Tensor:
    """:func:`per_expert_piece` over every piece of ``p``, into ``out`` ``[T, N]``; returns ``out``."""
    for first, w in p.pieces:
        per_expert_piece(p, out, first, w)
    return out
