"""A group's copy plans as the contention model runs them: lanes, hardware queues, overheads and the
program of every queue.

Shared by the two ways the model computes a result: the event simulation (:mod:`.sim_events`) and
the rotation quotient (:mod:`.sim_quotient`). Lanes and issue order come from
:mod:`dwdp_comm.lanes`, the rule the GPU executor applies.

A queue's **program** is a list of operations run one after the other:

* ``("w", key)``: wait until every copy (of every rank) that ``key`` names is done, plus the flag
  latency (time division: ``("slot", k)`` = every copy of slots ``< k``; ``("src", s, k)`` = every
  copy read from ``s`` in slots ``< k``). Copies from the rank itself take no part, as on the GPU.
* ``("d", seconds, unit)``: the fixed cost of issuing ``unit`` (no bytes move, the queue is busy).
* ``("x", unit)``: ``unit``'s bytes move; the queue waits until they have.

A **unit** is one copy, or (:meth:`GroupCopies.coalesced`) a run of consecutive copies of one lane
that read the same source with no wait between them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import bad_arg
from ..lanes import copy_lanes, hardware_queue, issue_order
from ..planner import CopyPlan

if TYPE_CHECKING:
    from .fabric import Fabric

__all__ = ["REC", "GroupCopies"]

#: One record per copy: rank, queue, source, slot, bytes, when its overhead began (``t_issue``),
#: when its bytes began to move (``t_data``), when they all had (``t_end``).
REC = np.dtype([("rank", np.int64), ("lane", np.int64), ("src", np.int64), ("slot", np.int64),
                ("nbytes", np.int64), ("t_issue", np.float64), ("t_data", np.float64), ("t_end", np.float64)])


class GroupCopies:
    """Every copy (or unit) of every rank as flat arrays, with its queue and the cost before it.

    Attributes
    ----------
    n : int
        Units.
    rank, lane, src, slot, nbytes : numpy.ndarray
        ``int64 [n]``; ``lane`` is the hardware queue (``[0, lanes_per_rank)``).
    dst : numpy.ndarray
        ``int64 [n]``: the rank (copies are pulls).
    local : numpy.ndarray
        ``bool [n]``: ``src == dst`` (never on the fabric, no part in time division).
    pre : numpy.ndarray
        ``float64 [n]``: seconds of issue cost before the unit's bytes move.
    waits : numpy.ndarray
        ``bool [n]``: a wait operation precedes the unit.
    lanes_per_rank, num_lanes : int
    lane_id : numpy.ndarray
        ``rank * lanes_per_rank + lane``.
    exec_lane : numpy.ndarray
        ``int64 [n]``: the executor's lane (before folding into hardware queues).
    order : numpy.ndarray
        ``int64 [n]``: the position in its rank's issue order.
    seq, bounds : numpy.ndarray
        Every unit in run order, queue after queue; queue ``q`` is ``seq[bounds[q]:bounds[q + 1]]``.
    runs : tuple of numpy.ndarray
        Coalesced units only: ``(seq, cut)`` of the original, unit ``u`` being its copies
        ``seq[cut[u]:cut[u + 1]]``.
    """

    def __init__(self, plans: Sequence[CopyPlan], group_size: int, opts: dict, fabric: "Fabric"):
        """``plans[r]``: rank ``r``'s plan, for the first ``len(plans)`` ranks of a group of ``group_size``."""
        G = group_size
        streams = opts["streams"]
        sync = opts["sync"] != "none"
        nq = min(streams + 1, fabric.max_streams)  # hardware queues in use (peer lanes and the local lane)
        cols: dict[str, list] = {k: [] for k in ("rank", "lane", "src", "slot", "nbytes", "order", "exec_lane")}
        for r, p in enumerate(plans):
            if p.group_size != G or p.rank != r:
                raise bad_arg("plans", f"plan {r} (rank={p.rank}, group_size={p.group_size})",
                              f"plan i made for rank i of a group of {G}")
            src = p.src_rank.astype(np.int64)
            lanes = copy_lanes(src, p.slot, rank=r, group_size=G, streams=streams, distribute=opts["distribute"])
            order = np.empty(len(p), dtype=np.int64)
            order[issue_order(lanes, p.slot, streams=streams, sync=sync)] = np.arange(len(p))
            cols["rank"].append(np.full(len(p), r, dtype=np.int64))
            cols["lane"].append(hardware_queue(lanes, streams=streams, max_queues=fabric.max_streams))
            cols["src"].append(src)
            cols["slot"].append(p.slot.astype(np.int64))
            cols["nbytes"].append(p.nbytes.astype(np.int64))
            cols["order"].append(order)
            cols["exec_lane"].append(lanes)
        cat = {k: (np.concatenate(v) if v else np.zeros(0, dtype=np.int64)) for k, v in cols.items()}
        self.lanes_per_rank, self.num_lanes = nq, len(plans) * nq  # plans[:k]: the first k ranks
        self._set(cat["rank"], cat["lane"], cat["src"], cat["slot"], cat["nbytes"], cat["order"], cat["exec_lane"])
        self.sync = opts["sync"]
        self._costs(opts, fabric)

    def _set(self, rank, lane, src, slot, nbytes, order, exec_lane) -> None:
        self.rank, self.lane, self.src, self.slot, self.nbytes = rank, lane, src, slot, nbytes
        self.exec_lane = exec_lane
        self.n = int(rank.shape[0])
        self.dst = rank
        self.local = src == rank
        self.lane_id = rank * self.lanes_per_rank + lane
        self.order = order
        # every queue's run order (the executor's issue order within each rank), queue after queue
        self.seq = np.lexsort((order, self.lane_id))
        self.bounds = np.searchsorted(self.lane_id[self.seq], np.arange(self.num_lanes + 1))
        self._lane_units = None

    @property
    def lane_units(self) -> list[list[int]]:
        """The units of each queue in the order it runs them (built on first use)."""
        if self._lane_units is None:
            flat = self.seq.tolist()
            b = self.bounds.tolist()
            self._lane_units = [flat[b[q]:b[q + 1]] for q in range(self.num_lanes)]
        return self._lane_units

    def _queue_start(self) -> np.ndarray:
        """``bool [n]`` in run order (:attr:`seq`): the unit is the first of its queue."""
        start = np.ones(self.n, dtype=bool)
        start[1:] = self.lane_id[self.seq][1:] != self.lane_id[self.seq][:-1]
        return start

    def wait_key(self, i: int):
        """The time-division key of unit ``i`` (None without time division, and for local copies)."""
        if self.sync == "none" or self.local[i]:
            return None
        if self.sync == "slot":
            return ("slot", int(self.slot[i]))
        return ("src", int(self.src[i]), int(self.slot[i]))

    def _costs(self, opts: dict, fabric: "Fabric") -> None:
        """``pre`` and ``waits`` of every unit: a wait where the key changes along its queue (copies
        from peers only); a batch call where a queue starts, changes lane or follows a wait."""
        seq, start = self.seq, self._queue_start()
        self.waits = np.zeros(self.n, dtype=bool)
        if self.sync != "none":
            keep = ~self.local[seq]
            r = seq[keep]  # copies from peers, in run order: the ones with a key
            first = np.ones(r.shape[0], dtype=bool)
            first[1:] = self.lane_id[r][1:] != self.lane_id[r][:-1]
            changed = np.zeros(r.shape[0], dtype=bool)
            changed[1:] = self.slot[r][1:] != self.slot[r][:-1]
            if self.sync == "source":
                changed[1:] |= self.src[r][1:] != self.src[r][:-1]
            self.waits[r] = first | changed
        if opts["api"] != "batch":
            self.pre = np.full(self.n, fabric.copy_overhead_s)
            return
        call = start.copy()
        call[1:] |= self.exec_lane[seq][1:] != self.exec_lane[seq][:-1]
        call |= self.waits[seq]
        self.pre = np.empty(self.n)
        self.pre[seq] = fabric.batch_copy_overhead_s + np.where(call, fabric.batch_call_overhead_s, 0.0)

    def program(self, q: int) -> list[tuple]:
        """The operations of queue ``q`` (see the module docstring)."""
        ops: list[tuple] = []
        pre, waits = self.pre, self.waits
        for i in self.lane_units[q]:
            if waits[i]:
                ops.append(("w", self.wait_key(i)))
            if pre[i] > 0:
                ops.append(("d", float(pre[i]), i))
            ops.append(("x", i))
        return ops

    def coalesced(self) -> "GroupCopies":
        """The same work with every run of consecutive units of a queue that read one source with no
        wait between them (the later ones) merged into one unit: bytes and issue costs add up, the
        costs now all before the run's bytes. Exact in the fluid model when the merged costs after
        the first are zero (``api="batch"``: nothing per copy); otherwise the run's costs move to
        its start. :meth:`expand` gives the copies' times back."""
        seq = self.seq
        head = self._queue_start()
        head[1:] |= (self.src[seq][1:] != self.src[seq][:-1]) | (self.exec_lane[seq][1:] != self.exec_lane[seq][:-1])
        head |= self.waits[seq]
        cut = np.flatnonzero(head)  # run starts, positions in seq
        h = seq[cut]
        out = object.__new__(GroupCopies)
        out.lanes_per_rank, out.num_lanes, out.sync = self.lanes_per_rank, self.num_lanes, self.sync
        nb = np.add.reduceat(self.nbytes[seq], cut) if cut.size else np.zeros(0, dtype=np.int64)
        out._set(self.rank[h], self.lane[h], self.src[h], self.slot[h], nb, self.order[h], self.exec_lane[h])
        out.pre = np.add.reduceat(self.pre[seq], cut) if cut.size else np.zeros(0)
        out.waits = self.waits[h].copy()
        out.runs = (seq, cut)  # unit u = seq[cut[u]:cut[u + 1]] of the original
        return out

    def expand(self, rec: np.ndarray, original: "GroupCopies", out: np.ndarray) -> None:
        """Per-copy times of ``original``'s copies into ``out`` from the unit records ``rec`` of these
        coalesced units: each run's span is split among its copies in their order, each copy's issue
        cost before its bytes, its bytes in proportion to its size."""
        seq, cut = self.runs
        if not cut.size:
            return
        run = np.repeat(np.arange(cut.size), np.diff(np.append(cut, seq.size)))  # run of each position
        t0, td, t1 = (rec[k][run] for k in ("t_issue", "t_data", "t_end"))
        d = original.pre[seq]
        b = original.nbytes[seq].astype(np.float64)
        bsum = np.add.reduceat(b, cut)[run]
        dsum = np.add.reduceat(d, cut)[run]
        size = np.diff(np.append(cut, seq.size))[run]
        share = np.where(bsum > 0, b / np.where(bsum > 0, bsum, 1.0), 1.0 / size)
        moving = (t1 - td) * share
        gap = np.maximum(td - t0 - dsum, 0.0)  # waited (a flag, a busy source) before its first byte
        step = np.cumsum(d + moving)
        step -= (step - (d + moving))[cut][run]  # inclusive cumulative sum within the run
        begin = t0 + gap + step - (d + moving)
        first = np.zeros(seq.size, dtype=bool)
        first[cut] = True
        out["t_issue"][seq] = np.where(first, t0, begin)
        out["t_data"][seq] = begin + d
        out["t_end"][seq] = begin + d + moving
