"""The event simulation of the contention model: every unit of every rank, timers in a heap,
transfers advanced at their max-min fair rates, recomputed whenever the set of moving transfers
changes. The reference every faster path of :func:`dwdp_comm.bench.model.simulate` is checked against.

Executors (see :mod:`dwdp_comm.bench.model`): ``per_stream`` (every queue runs its program on its
own; ``arbitration="fair"`` or ``"fifo"``) and ``issue_fifo`` (the one-thread calibration harness).
Cost: about one max-min solve per change of the moving set and a few Python steps per unit.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from .maxmin import maxmin_rates
from .sim_program import GroupCopies

if TYPE_CHECKING:
    from .fabric import Fabric

__all__ = ["run_per_stream", "run_issue_fifo", "ports"]

_EPS_T = 1e-12


def ports(fabric: "Fabric", c: GroupCopies) -> tuple[np.ndarray, np.ndarray]:
    """``(ports [n, 4], caps)``: the ports each unit's transfer uses (egress and duplex of its
    source, ingress and duplex of its destination; a local copy only its GPU's local-copy port) and
    every port's capacity."""
    G = fabric.group_size
    caps = np.concatenate([np.full(G, fabric.egress_Bps), np.full(G, fabric.ingress_Bps),
                           np.full(G, fabric.duplex_Bps if fabric.duplex_Bps else np.inf),
                           np.full(G, fabric.local_Bps)])
    s, d, local = c.src, c.dst, c.local
    p = np.stack([s, G + d, 2 * G + s, 2 * G + d], axis=1)
    nl = int(local.sum())
    p[local] = np.stack([3 * G + s[local], np.full(nl, -1), np.full(nl, -1), np.full(nl, -1)], axis=1)
    if fabric.duplex_Bps is None:
        p[~local, 2:] = -1
    return p, caps


class _Loop:
    """Shared event loop: timers in a heap, transfers advanced by their max-min rates."""

    def __init__(self, fabric: "Fabric", c: GroupCopies, rec: np.ndarray, starts: np.ndarray):
        self.f, self.c, self.rec, self.starts = fabric, c, rec, starts
        self.ports, self.caps = ports(fabric, c)
        self.active: list[int] = []  # units moving bytes now (or queued behind a reader, with fifo)
        self.remaining = c.nbytes.astype(np.float64).copy()
        self.t = 0.0
        self.timers: list[tuple[float, int, Any]] = []
        self._seq = 0
        self.done = np.zeros(c.n, dtype=bool)
        self.num_done = 0
        self._last_act: list[int] | None = None
        self._solved: dict[bytes, np.ndarray] = {}

    def at(self, when: float, what: Any) -> None:
        self._seq += 1
        heapq.heappush(self.timers, (max(when, self.t), self._seq, what))

    def start_transfer(self, i: int) -> None:
        self.rec["t_data"][i] = self.t
        if self.c.nbytes[i] == 0:
            self.finish(i)
        else:
            self.active.append(i)
            self.on_transfer_registered(i)

    def run(self) -> None:
        self.setup()
        stall = 0
        nbytes = self.c.nbytes
        idx = tol = rates = None
        while self.num_done < self.c.n:
            act = self.moving()
            if act != self._last_act:  # rates depend only on which transfers move
                self._last_act = list(act)
                idx = np.array(act, dtype=np.int64)
                rates = self._rates(self.ports[idx]) if act else np.zeros(0)
                tol = np.maximum(1.0, 1e-9 * nbytes[idx])
            t_next = self.timers[0][0] if self.timers else math.inf
            if act:
                rem = self.remaining[idx]
                with np.errstate(divide="ignore"):
                    fin = np.where(rates > 0, rem / np.where(rates > 0, rates, 1.0), np.inf)
                k_min = int(np.argmin(fin))
                dt_x = float(fin[k_min])
            else:
                dt_x = math.inf
            dt = min(t_next - self.t, dt_x)
            if not math.isfinite(dt):
                raise RuntimeError(f"model deadlock at t={self.t:.6g}s: {self.c.n - self.num_done} copies left "
                                   "(a sync wait that can never be satisfied?)")
            dt = max(dt, 0.0)
            finished = []
            if act:
                rem -= rates * dt
                self.remaining[idx] = rem
                finished = [act[k] for k in np.flatnonzero(rem <= tol).tolist()]
                if dt == dt_x and not finished:  # rounding: finish the earliest
                    finished = [act[k_min]]
            self.t += dt
            for i in finished:
                self.remaining[i] = 0.0
                self.active.remove(i)
                self.finish(i)
            while self.timers and self.timers[0][0] <= self.t + _EPS_T:
                _, _, what = heapq.heappop(self.timers)
                self.on_timer(what)
            stall = stall + 1 if dt == 0 and not finished else 0
            if stall > 10 * (self.c.n + 10):
                raise RuntimeError("model made no progress (internal error)")

    def _rates(self, ports: np.ndarray) -> np.ndarray:
        """Max-min rates of transfers on ``ports``; the same ports in the same order recur (a
        quarter of the solves of a 72-rank exchange), so solved sets are kept."""
        key = ports.tobytes()
        got = self._solved.get(key)
        if got is None:
            got = maxmin_rates(ports, self.caps)
            if len(self._solved) >= 4096:
                self._solved.clear()
            self._solved[key] = got
        return got

    def finish(self, i: int) -> None:
        self.rec["t_end"][i] = self.t
        self.done[i] = True
        self.num_done += 1
        self.on_finish(i)

    # hooks
    def setup(self) -> None: ...
    def on_timer(self, what) -> None: ...
    def on_finish(self, i: int) -> None: ...
    def on_transfer_registered(self, i: int) -> None: ...

    def moving(self) -> list[int]:
        """Units whose bytes move now (all registered transfers, unless arbitration queues them)."""
        return self.active


class _PerStream(_Loop):
    """Each queue runs its program in order (see :mod:`.sim_program`)."""

    def __init__(self, fabric, c: GroupCopies, rec, starts, arbitration):
        super().__init__(fabric, c, rec, starts)
        self.arb = arbitration
        self.ops = [c.program(q) for q in range(c.num_lanes)]
        self.pc = [0] * c.num_lanes  # next op of each queue
        self.blocked: dict[tuple, list[int]] = {}  # wait key -> queues
        G = fabric.group_size
        # time-division bookkeeping: copies from peers only (local copies take no part)
        self.divided = c.sync != "none"
        remote = ~c.local if self.divided else np.zeros(c.n, dtype=bool)
        nslot = int(c.slot[remote].max()) + 1 if remote.any() else 0
        self.slot_left = np.bincount(c.slot[remote], minlength=nslot).astype(np.int64)
        self.low_slot, self.low_slot_time = 0, [0.0]  # all slots < low_slot done; time each became so
        self.src_left = np.zeros((G, max(nslot, 1)), dtype=np.int64)
        if remote.any():
            np.add.at(self.src_left, (c.src[remote], c.slot[remote]), 1)
        self.low_src = [0] * G
        self.low_src_time: list[list[float]] = [[0.0] for _ in range(G)]
        self._advance_slot()
        for s in range(G):
            self._advance_src(s)
        self.queues: dict[int, deque] = {s: deque() for s in range(G)}

    def moving(self) -> list[int]:
        if self.arb == "fair":
            return self.active
        return [q[0] for q in self.queues.values() if q]

    def on_transfer_registered(self, i: int) -> None:
        if self.arb == "fifo":
            q = self.queues[int(self.c.src[i])]
            q.append(i)
            if len(q) > 1:  # queued behind another reader: its bytes start moving later
                self.rec["t_data"][i] = np.nan

    def setup(self) -> None:
        for lane in range(self.c.num_lanes):
            if self.ops[lane]:
                r = lane // self.c.lanes_per_rank
                self.at(float(self.starts[r]), ("go", lane))

    def on_timer(self, what) -> None:
        self._step(what[1])

    def _step(self, lane: int) -> None:
        """Run lane's ops from its program counter until it must wait for time or bytes."""
        ops = self.ops[lane]
        t_issue = self.rec["t_issue"]
        while self.pc[lane] < len(ops):
            op = ops[self.pc[lane]]
            self.pc[lane] += 1
            if op[0] == "d":
                if math.isnan(t_issue[op[2]]):
                    t_issue[op[2]] = self.t  # a copy's issue = when its first overhead began
                self.at(self.t + op[1], ("go", lane))
                return
            elif op[0] == "w":
                t_ok = self._satisfied(op[1])
                if t_ok is None:
                    self.pc[lane] -= 1
                    self.blocked.setdefault(op[1], []).append(lane)
                    return
                release = max(self.t, t_ok + self.f.flag_latency_s)
                if release > self.t + _EPS_T:
                    self.at(release, ("go", lane))
                    return
            else:
                if math.isnan(t_issue[op[1]]):
                    t_issue[op[1]] = self.t
                self.start_transfer(op[1])
                return

    def _satisfied(self, key) -> float | None:
        if key[0] == "slot":
            k = key[1]
            return self.low_slot_time[k] if self.low_slot >= k else None
        s, k = key[1], key[2]
        return self.low_src_time[s][k] if self.low_src[s] >= k else None

    def _advance_slot(self) -> None:
        n = self.slot_left.shape[0]
        while self.low_slot < n and self.slot_left[self.low_slot] == 0:
            self.low_slot += 1
            self.low_slot_time.append(self.t)

    def _advance_src(self, s: int) -> None:
        row = self.src_left[s]
        while self.low_src[s] < row.shape[0] and row[self.low_src[s]] == 0:
            self.low_src[s] += 1
            self.low_src_time[s].append(self.t)

    def on_finish(self, i: int) -> None:
        c = self.c
        if self.arb == "fifo":
            q = self.queues[int(c.src[i])]
            q.remove(i)
            if q and math.isnan(self.rec["t_data"][q[0]]):
                self.rec["t_data"][q[0]] = self.t
        if self.divided and not c.local[i]:
            s, k = int(c.src[i]), int(c.slot[i])
            self.slot_left[k] -= 1
            self.src_left[s, k] -= 1
            self._advance_slot()
            self._advance_src(s)  # only this source's count changed
        if self.blocked:
            ready = [k for k in self.blocked if self._satisfied(k) is not None]
            for k in ready:
                for lane in self.blocked.pop(k):
                    self.at(self.t, ("go", lane))
        self.at(self.t, ("go", int(c.lane_id[i])))


class _IssueFifo(_Loop):
    """One queue per source GPU, in host issue order; the head waits for its stream predecessor."""

    def __init__(self, fabric, c: GroupCopies, rec, starts, issue_order):
        super().__init__(fabric, c, rec, starts)
        if issue_order == "stream":
            order = np.lexsort((np.arange(c.n), c.rank))  # rank by rank, each plan in order
        else:
            order = np.lexsort((c.rank, c.slot))
        self.queue: dict[int, deque] = {s: deque() for s in range(fabric.group_size)}
        for i in order.tolist():
            self.queue[int(c.src[i])].append(i)
        self.pred = np.full(c.n, -1, dtype=np.int64)
        for cs in c.lane_units:
            for a, b in zip(cs, cs[1:]):
                self.pred[b] = a
        self.busy: dict[int, int] = {}  # source -> copy at its head (in overhead or moving)

    def setup(self) -> None:
        for r in sorted(set(self.starts.tolist())):
            self.at(r, ("check",))
        self._check()

    def _eligible(self, i: int) -> bool:
        p = int(self.pred[i])
        return (p < 0 or self.done[p]) and self.starts[self.c.rank[i]] <= self.t + _EPS_T

    def _check(self) -> None:
        for s, q in self.queue.items():
            if s in self.busy or not q or not self._eligible(q[0]):
                continue
            i = q.popleft()
            self.busy[s] = i
            self.rec["t_issue"][i] = self.t
            over = self.f.harness_copy_overhead_s
            self.at(self.t + (self.f.copy_overhead_s if over is None else over), ("data", i))

    def on_timer(self, what) -> None:
        if what[0] == "data":
            self.start_transfer(what[1])
        else:
            self._check()

    def on_finish(self, i: int) -> None:
        del self.busy[int(self.c.src[i])]
        self._check()


def run_per_stream(fabric: "Fabric", c: GroupCopies, rec: np.ndarray, starts: np.ndarray, arbitration: str) -> None:
    """Fill ``rec``'s times (one record per unit of ``c``) by the ``per_stream`` event simulation."""
    _PerStream(fabric, c, rec, starts, arbitration).run()


def run_issue_fifo(fabric: "Fabric", c: GroupCopies, rec: np.ndarray, starts: np.ndarray, issue_order: str) -> None:
    """Fill ``rec``'s times by the ``issue_fifo`` (one-thread harness) event simulation."""
    _IssueFifo(fabric, c, rec, starts, issue_order).run()
