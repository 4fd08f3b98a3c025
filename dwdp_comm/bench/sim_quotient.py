"""The rotation quotient of the contention model: the exact result of a symmetric exchange from one
rank's copies.

When rank ``r``'s plan is rank 0's with every source shifted by ``r`` (``src -> (src + r) mod G``,
the same slots, sizes and order: the full exchange under ``rotated``, ``round_robin``,
``parallel``, ``tdm``, ...) and every rank starts at once, the fluid model is invariant under the
rotation: every rank does at every moment what rank 0 does, shifted. Max-min fair sharing has one
solution, so it is rotation invariant too. With ``n`` of rank 0's transfers from peers moving, every
GPU's egress and ingress port then carry ``n`` transfers and its duplex port ``2 n``, so each moves
at ``min(E, I, D / 2) / n``: rank 0's queues share one processor of that capacity (and local copies
one of ``local_Bps``). Time division waits on copies of earlier slots of every rank; by the rotation
those finish when rank 0's do (``slot`` and ``source`` keys alike). So a simulation of rank 0's
queues alone, with processor sharing instead of a max-min solve, gives every rank's times exactly:
its cost grows with the copies of one rank, not of the group.

``fifo`` arbitration (a source serves one reader at a time) is the same model where each rank has
one queue: each source then has exactly one reader at any time. With several queues it breaks ties
between simultaneous readers by rank, which is not rotation invariant: not covered here.
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..planner import CopyPlan
from .sim_program import GroupCopies

if TYPE_CHECKING:
    from .fabric import Fabric

__all__ = ["rotation_invariant", "run_quotient"]

_EPS_T = 1e-12


def rotation_invariant(plans: Sequence[CopyPlan]) -> bool:
    """True when every rank's plan is rank 0's rotated (sources shifted by the rank; same slots,
    sizes and order). Plans of the wrong rank or group size are not (the caller reports them)."""
    G = len(plans)
    if G == 0 or any(p.group_size != G or p.rank != r for r, p in enumerate(plans)):
        return False
    n = len(plans[0])
    if any(len(p) != n for p in plans):
        return False
    if n == 0:
        return True
    shift = np.arange(G, dtype=np.int64)[:, None]
    src = np.stack([p.src_rank for p in plans])
    if not np.array_equal((src - shift) % G, np.broadcast_to(src[0], src.shape)):
        return False
    for name in ("slot", "nbytes"):
        col = np.stack([getattr(p, name) for p in plans])
        if not (col == col[0]).all():
            return False
    return True


def run_quotient(fabric: "Fabric", c: GroupCopies, start: float) -> np.ndarray:
    """Times ``[3, n]`` (``t_issue``, ``t_data``, ``t_end``) of rank 0's units ``c`` (a
    :class:`GroupCopies` of rank 0's plan alone) in the rotation-invariant exchange, every rank
    starting at ``start``.

    Processor sharing: the ``n_r`` moving transfers from peers each at ``C / n_r`` with
    ``C = min(egress, ingress, duplex / 2)``, the local ones at ``local_Bps / n_l``; each queue runs
    its program (:meth:`GroupCopies.program`) as the event simulation does.
    """
    cap_r = min(fabric.egress_Bps, fabric.ingress_Bps,
                fabric.duplex_Bps / 2 if fabric.duplex_Bps else math.inf)
    cap = (cap_r, fabric.local_Bps)
    flag = fabric.flag_latency_s
    n = c.n
    nbytes = c.nbytes.tolist()
    kind = [1 if x else 0 for x in c.local.tolist()]  # server: 0 = peers (fabric), 1 = local copies
    t_issue, t_data, t_end = [math.nan] * n, [math.nan] * n, [math.nan] * n
    progs = [c.program(q) for q in range(c.num_lanes)]
    lane_of = c.lane_id.tolist()
    slot_of = c.slot.tolist()
    pc = [0] * c.num_lanes
    # time division: every copy from a peer of slots < k done (rank 0's, hence every rank's)
    remote_slots = c.slot[~c.local]
    left = np.bincount(remote_slots, minlength=int(remote_slots.max()) + 1).tolist() if remote_slots.size else []
    low, low_time = 0, [0.0]
    while low < len(left) and left[low] == 0:
        low += 1
        low_time.append(start)
    blocked: dict[int, list[int]] = {}
    timers: list[tuple[float, int, int]] = []
    seq = 0
    # per server: virtual work done per transfer so far, and the moving transfers' virtual finishes
    work = [0.0, 0.0]
    moving: list[dict[int, float]] = [{}, {}]
    t = start
    done = 0

    def push(when: float, q: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(timers, (max(when, t), seq, q))

    def step(q: int) -> None:
        ops = progs[q]
        while pc[q] < len(ops):
            op = ops[pc[q]]
            pc[q] += 1
            if op[0] == "d":
                if math.isnan(t_issue[op[2]]):
                    t_issue[op[2]] = t
                push(t + op[1], q)
                return
            if op[0] == "w":
                k = op[1][-1]  # ("slot", k) or ("src", s, k): the same condition here
                if low < k:
                    pc[q] -= 1
                    blocked.setdefault(k, []).append(q)
                    return
                release = max(t, low_time[k] + flag)
                if release > t + _EPS_T:
                    push(release, q)
                    return
                continue
            i = op[1]
            if math.isnan(t_issue[i]):
                t_issue[i] = t
            t_data[i] = t
            if nbytes[i] == 0:
                finish(i)
                continue
            moving[kind[i]][i] = work[kind[i]] + nbytes[i]
            return

    def finish(i: int) -> None:
        nonlocal done, low
        t_end[i] = t
        done += 1
        if not kind[i]:
            k = slot_of[i]
            left[k] -= 1
            while low < len(left) and left[low] == 0:
                low += 1
                low_time.append(t)
            for kk in [kk for kk in blocked if kk <= low]:
                for q in blocked.pop(kk):
                    push(t, q)

    for q in range(c.num_lanes):
        if progs[q]:
            push(start, q)
    while done < n:
        t_next, by = (timers[0][0] if timers else math.inf), -1
        for s in (0, 1):
            if moving[s]:
                ahead = min(moving[s].values()) - work[s]
                t_fin = t + max(ahead, 0.0) * len(moving[s]) / cap[s]
                if t_fin < t_next:
                    t_next, by = t_fin, s
        if not math.isfinite(t_next):
            raise RuntimeError(f"model deadlock at t={t:.6g}s: {n - done} copies left (a sync wait that can never "
                               "be satisfied?)")
        for s in (0, 1):
            if moving[s]:
                work[s] += (t_next - t) * cap[s] / len(moving[s])
        t = max(t, t_next)
        for s in (0, 1):
            if moving[s]:
                ends = [i for i, f in moving[s].items() if f - work[s] <= max(1.0, 1e-9 * nbytes[i])]
                if not ends and s == by:  # rounding: the transfer that set this time ends now
                    ends = [min(moving[s], key=moving[s].get)]
                for i in ends:
                    del moving[s][i]
                    finish(i)
                    push(t, lane_of[i])
        while timers and timers[0][0] <= t + _EPS_T:
            _, _, q = heapq.heappop(timers)
            step(q)
    return np.array([t_issue, t_data, t_end], dtype=np.float64).reshape(3, n)
