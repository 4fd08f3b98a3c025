"""A fluid model of the copy plane: copy engines, per-GPU port caps, per-copy overhead, schedules.

The model answers "how long does this set of copy plans take on that fabric" for group sizes we
cannot rent. It is calibrated on the 4 x H200 table of ``DEVICE_NOTES.md``
(``calibration_h200x4.json``; :mod:`dwdp_comm.bench.calibrate` prints model against measurement).

What is modelled
----------------
* **Ports.** GPU ``g`` has an egress cap ``E``, an ingress cap ``I`` and a duplex cap ``D`` on
  egress + ingress together (NVLink sends and receives on the same links; the ring row of the
  table runs at 386 GB/s per GPU against 394 for a lone pair). A transfer ``s -> d`` uses the
  egress and duplex ports of ``s`` and the ingress and duplex ports of ``d``. Concurrent transfers
  share ports **max-min fairly** (progressive filling), recomputed at every event. A local copy
  (``s == d``) uses only ``local_Bps`` of its GPU.
* **Copies.** A copy is a fixed overhead (no bytes move, the copy's stream is busy) followed by a
  transfer of its bytes. ``api="memcpy"``: ``copy_overhead_s`` per copy. ``api="batch"``:
  ``batch_call_overhead_s`` per call plus ``batch_copy_overhead_s`` per copy. On H200 these are the
  GPU-side costs measured on 2 x H200 with the host issuing ahead (``perf/gpu_copy_plane.py``,
  2026-11-29): 3.9 us per ``cuMemcpyAsync`` and per graph node, nothing measurable per batched
  copy (the per-call cost is assumed to be one launch, 3.9 us). The one-thread calibration
  harness (``issue_fifo``) is bound by the host's issue cost instead: ``harness_copy_overhead_s``
  (8.5 us, fitted to the 1 / 16 / 256 copies rows).
* **Streams.** A plan runs on the lanes the GPU executor uses, by the same function
  (:func:`dwdp_comm.lanes.copy_lanes`): ``streams`` lanes for peers' copies
  (``distribute="source"``: lane ``((src - rank - 1) mod G) mod streams``; ``"slot"``: lane
  ``slot mod streams``) and one more for local copies (``src == rank``); a lane runs its copies in
  plan order. Lanes beyond ``max_streams`` hardware queues share one
  (:func:`dwdp_comm.lanes.hardware_queue`), as CUDA streams beyond ``CUDA_DEVICE_MAX_CONNECTIONS`` do.
* **Executors** (who runs the copies, and in which order):

  ``per_stream``
      The DWDP deployment: one process per GPU, each pulling on its own copy streams. Every lane
      progresses independently. ``arbitration="fair"`` (default) lets concurrent readers of a
      source share its egress max-min fairly; ``arbitration="fifo"`` lets a source serve one
      transfer at a time in arrival order (the pessimistic bracket: it is what the one-process
      harness shows, see below).
  ``issue_fifo``
      The calibration harness: one host thread drives every GPU. Each copy runs on a FIFO queue
      of its **source** GPU in host issue order; the copy at the head waits for its stream
      predecessor and blocks the copies queued behind it (head-of-line blocking). With the
      harness's issue order (rank by rank, each rank's plan in order) this reproduces every row
      of the table, the "drift" rows included, with no fabric loss factor
      (see ``docs/benchmarks.md``). It is a hypothesis that fits, not a documented driver
      behaviour; ``issue_order="slot"`` predicts what re-ordering the host loop would do.
* **Time division** (``sync``; ``per_stream`` only). ``"slot"``: a lane starts the copies of slot
  ``k`` once every rank finished every copy of slots ``< k`` (a copy-plane barrier per slot: flags
  in symmetric memory, stream wait-value operations), plus ``flag_latency_s`` (5 us on H200:
  fitted to the measured pair, 8 MiB slots, 69.9 %; the measured two-GPU exchange loses more,
  55.5 % against the model's 68 % at 8 MiB and 73.9 % against 90 % at 64 MiB: the barrier
  couples the ranks in a way the model does not capture, so its ``tdm`` rows are optimistic). ``"source"``: a copy
  of slot ``k`` from source ``s`` waits only for the copies from ``s`` of earlier slots (a token
  handed from reader to reader of each source). Compute streams never wait in either.
* **Skew.** Each rank's copies may not begin before its start time (``starts``).

What is not modelled: HBM contention with compute, NVSwitch internals (a switch is assumed non
blocking), copy-engine counts and their time slicing, host issue cost (copies are assumed issued
ahead of the engines), launch jitter (the model is deterministic: ties stay tied).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from ..engine_options import parse_engine_options
from ..errors import bad_arg
from ..lanes import copy_lanes, hardware_queue
from ..planner import CopyPlan

__all__ = ["Fabric", "h200", "nvl72", "EXECUTORS", "ARBITRATIONS", "parse_options", "simulate",
           "SimResult", "maxmin_rates", "pair_rate"]

EXECUTORS = ("per_stream", "issue_fifo")
ARBITRATIONS = ("fair", "fifo")


@dataclass(frozen=True)
class Fabric:
    """Caps and overheads of one group of GPUs (bytes/s and seconds).

    Attributes
    ----------
    group_size : int
    egress_Bps, ingress_Bps : float
        Per-GPU caps of what a copy engine moves out of / into one GPU over the fabric.
    duplex_Bps : float or None
        Cap on egress + ingress of one GPU (None: no such cap).
    local_Bps : float
        Device-local copy rate (copies with ``src == dst``).
    copy_overhead_s : float
        Fixed cost of one ``cudaMemcpyAsync`` on a stream (no bytes move meanwhile), GPU side.
    batch_call_overhead_s, batch_copy_overhead_s : float
        ``cudaMemcpyBatchAsync``: per call, and per copy inside a call.
    graph_copy_overhead_s : float
        Per memcpy node of a captured graph.
    flag_latency_s : float
        From the last copy of a slot to the release of a stream waiting on its flag.
    harness_copy_overhead_s : float or None
        Per copy in the ``issue_fifo`` executor (one host thread issuing every copy: the host's
        cost per call included). None: ``copy_overhead_s``.
    max_streams : int
        Hardware queues a GPU gives one process (``CUDA_DEVICE_MAX_CONNECTIONS``, default 8):
        lanes beyond it share a queue (lane ``l`` runs on queue ``l mod max_streams``, in plan order).
    name, notes : str
    """

    group_size: int
    egress_Bps: float
    ingress_Bps: float
    duplex_Bps: float | None
    local_Bps: float
    copy_overhead_s: float
    batch_call_overhead_s: float
    batch_copy_overhead_s: float
    graph_copy_overhead_s: float
    flag_latency_s: float
    harness_copy_overhead_s: float | None = None
    max_streams: int = 8
    name: str = ""
    notes: str = ""

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)) \
                or self.group_size < 1:
            raise bad_arg("group_size", self.group_size, "an int >= 1")
        for k in ("egress_Bps", "ingress_Bps", "local_Bps"):
            if not getattr(self, k) > 0:
                raise bad_arg(k, getattr(self, k), "a rate in bytes/s > 0")
        if isinstance(self.max_streams, bool) or not isinstance(self.max_streams, (int, np.integer)) \
                or self.max_streams < 1:
            raise bad_arg("max_streams", self.max_streams, "an int >= 1")
        if self.duplex_Bps is not None and not self.duplex_Bps > 0:
            raise bad_arg("duplex_Bps", self.duplex_Bps, "None or a rate in bytes/s > 0")
        for k in ("copy_overhead_s", "batch_call_overhead_s", "batch_copy_overhead_s",
                  "graph_copy_overhead_s", "flag_latency_s"):
            if not getattr(self, k) >= 0:
                raise bad_arg(k, getattr(self, k), "a time in seconds >= 0")
        if self.harness_copy_overhead_s is not None and not self.harness_copy_overhead_s >= 0:
            raise bad_arg("harness_copy_overhead_s", self.harness_copy_overhead_s, "None or a time in seconds >= 0")

    def with_(self, **changes: Any) -> "Fabric":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def pair_Bps(self) -> float:
        """The bandwidth of one large copy between two GPUs (overhead excluded)."""
        return min(self.egress_Bps, self.ingress_Bps)


# Caps fitted to DEVICE_NOTES.md (4 x H200, NVLink4 x 18 through NVSwitch, 2026-11-22): pair 394
# GB/s; ring 1545 = 4 x 386 GB/s gives the duplex cap 2 x 386; local copy 2.06 TB/s. That table's
# 1 GiB as 1 / 16 / 256 copies (393 / 371 / 221 GB/s), issued by one host thread, gives ~8.5 us per
# copy: the harness's cost. Per-copy costs on the GPU, measured on 2 x H200 (2026-11-29, host
# issuing ahead): 3.9 us per cuMemcpyAsync and per graph node (8 MiB chunks: 84.5 % of one 1 GiB
# copy), nothing measurable per batched copy; the batch call's own cost (one launch) is assumed;
# flags 5 us (tdm, pair, 8 MiB slots: 69.9 %).
_H200 = dict(egress_Bps=394e9, ingress_Bps=394e9, duplex_Bps=772e9, local_Bps=2.06e12,
             copy_overhead_s=3.9e-6, batch_call_overhead_s=3.9e-6, batch_copy_overhead_s=0.0,
             graph_copy_overhead_s=3.9e-6, flag_latency_s=5.0e-6, harness_copy_overhead_s=8.5e-6)


def h200(group_size: int = 4) -> Fabric:
    """H200 SXM GPUs on NVSwitch (NVLink4, 18 links): the calibrated caps, ``group_size`` GPUs.

    Group sizes above 4 (an 8-GPU HGX board) assume the same per-GPU caps: every GPU has its own
    18 links into the switches, and the switches are non blocking.
    """
    return Fabric(group_size=group_size, name=f"h200x{group_size}",
                  notes="caps calibrated on 4 x H200 (DEVICE_NOTES.md); per-copy costs measured on 2 x H200",
                  **_H200)


def nvl72(group_size: int = 72) -> Fabric:
    """An NVL72-like domain: 1.8 TB/s per GPU bidirectional (NVLink5), ``group_size`` GPUs.

    Assumptions: 900 GB/s per direction nominal; a copy engine reaches the same fraction of nominal
    as on H200 (394 of 478 GB/s: 82.4 %), so 742 GB/s per direction; the same duplex loss as on
    H200 (386 / 394); per-copy overheads as on H200 (a CUDA driver property, not a link property);
    local HBM3e copies at 2 x 2.06 TB/s (8 TB/s HBM against 4.8).
    """
    frac = 394.0 / 478.0
    e = 900e9 * frac
    return Fabric(group_size=group_size, egress_Bps=e, ingress_Bps=e, duplex_Bps=2 * e * 386.0 / 394.0,
                  local_Bps=4.12e12, **{k: v for k, v in _H200.items() if k.endswith("_s")},
                  name=f"nvl72x{group_size}",
                  notes="1.8 TB/s per GPU bidirectional nominal, H200 efficiency and overheads assumed")


def parse_options(options: Mapping[str, Any] | None) -> dict:
    """Validate engine options for the model; return them with defaults filled in.

    The GPU executor's rule (:func:`dwdp_comm.engine_options.parse_engine_options`), except that
    ``api`` defaults to ``"memcpy"`` (single copies, as the calibration table was measured).
    Unknown names raise ``InvalidArgumentError`` naming them.
    """
    return parse_engine_options(options, "model", default_api="memcpy")


# ---- max-min fair rates ---------------------------------------------------------------------------
def maxmin_rates(ports: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Max-min fair rates by progressive filling.

    Parameters
    ----------
    ports : numpy.ndarray
        ``int64 [num_flows, k]``: the ports each flow uses (``-1``: none).
    caps : numpy.ndarray
        ``float64 [num_ports]``: capacity of each port.

    Returns
    -------
    numpy.ndarray
        ``float64 [num_flows]`` rates; every flow is limited by some saturated port.
    """
    nf = ports.shape[0]
    rate = np.zeros(nf)
    if nf == 0:
        return rate
    valid = ports >= 0
    if not valid.any(axis=1).all():
        raise ValueError("a flow uses no port")
    fi = np.nonzero(valid)[0]  # one entry per (flow, port) incidence
    used, pi = np.unique(ports[valid], return_inverse=True)
    cap = caps[used].astype(np.float64)
    rem = cap.copy()
    live = np.ones(nf, dtype=bool)
    live_e = np.ones(fi.shape[0], dtype=bool)
    while True:
        cnt = np.bincount(pi[live_e], minlength=used.shape[0])
        busy = cnt > 0
        share = np.full(used.shape[0], np.inf)
        share[busy] = rem[busy] / cnt[busy]
        inc = float(share.min())
        if not math.isfinite(inc):
            raise ValueError("a flow uses no finite port")
        rate[live] += inc
        rem -= inc * cnt
        sat = busy & (rem <= 1e-9 * np.maximum(cap, 1.0))
        if not sat.any():  # rounding: freeze at the tightest port
            sat = busy & (share <= inc * (1 + 1e-12))
        live[fi[live_e & sat[pi]]] = False
        if not live.any():
            return rate
        live_e &= live[fi]


def pair_rate(fabric: Fabric, nbytes: int) -> float:
    """Bytes/s of one copy of ``nbytes`` between two idle GPUs, overhead included."""
    if nbytes <= 0:
        raise bad_arg("nbytes", nbytes, "an int > 0")
    return nbytes / (fabric.copy_overhead_s + nbytes / fabric.pair_Bps)


# ---- results --------------------------------------------------------------------------------------
@dataclass
class SimResult:
    """What :func:`simulate` returns.

    Attributes
    ----------
    starts, ends : numpy.ndarray
        ``float64 [G]``: each rank's start time and the end of its last copy (its start when it has
        none), in seconds.
    records : numpy.ndarray
        One row per copy, structured: ``rank, lane, src, slot, nbytes, t_issue`` (overhead begins),
        ``t_data`` (bytes begin to move), ``t_end``.
    """

    starts: np.ndarray
    ends: np.ndarray
    records: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def durations(self) -> np.ndarray:
        """Each rank's own duration (end - its start)."""
        return self.ends - self.starts

    @property
    def makespan(self) -> float:
        """From the earliest start to the last end."""
        return float(self.ends.max() - self.starts.min())


_REC = np.dtype([("rank", np.int64), ("lane", np.int64), ("src", np.int64), ("slot", np.int64),
                 ("nbytes", np.int64), ("t_issue", np.float64), ("t_data", np.float64), ("t_end", np.float64)])


# ---- simulation -----------------------------------------------------------------------------------
class _Copies:
    """Flat arrays of every copy of every rank, with the lane each runs on."""

    def __init__(self, plans: Sequence[CopyPlan], G: int, opts: dict, max_streams: int):
        ranks, lanes, srcs, slots, nbs = [], [], [], [], []
        streams = opts["streams"]
        nq = min(streams + 1, max_streams)  # hardware queues in use (peer lanes and the local lane)
        for r, p in enumerate(plans):
            if p.group_size != G or p.rank != r:
                raise bad_arg("plans", f"plan {r} (rank={p.rank}, group_size={p.group_size})",
                              f"plan i made for rank i of a group of {G}")
            src = p.src_rank.astype(np.int64)
            lane = hardware_queue(copy_lanes(src, p.slot, rank=r, group_size=G, streams=streams,
                                             distribute=opts["distribute"]), streams=streams, max_queues=max_streams)
            ranks.append(np.full(len(p), r, dtype=np.int64))
            lanes.append(lane)
            srcs.append(src)
            slots.append(p.slot.astype(np.int64))
            nbs.append(p.nbytes.astype(np.int64))
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
        self.rank, self.lane, self.src = cat(ranks), cat(lanes), cat(srcs)
        self.slot, self.nbytes = cat(slots), cat(nbs)
        self.n = int(self.rank.shape[0])
        self.dst = self.rank
        # lane id = rank * queues + lane; copies of a lane in plan order
        self.lanes_per_rank = nq
        self.lane_id = self.rank * nq + self.lane
        self.num_lanes = G * nq
        order = np.lexsort((np.arange(self.n), self.lane_id))
        self.lane_copies: list[list[int]] = [[] for _ in range(self.num_lanes)]
        for i in order.tolist():
            self.lane_copies[int(self.lane_id[i])].append(i)


class _Flows:
    """Active transfers with their ports; rates are max-min fair over the ports."""

    def __init__(self, fabric: Fabric, copies: _Copies):
        G = fabric.group_size
        self.caps = np.concatenate([np.full(G, fabric.egress_Bps), np.full(G, fabric.ingress_Bps),
                                    np.full(G, fabric.duplex_Bps if fabric.duplex_Bps else np.inf),
                                    np.full(G, fabric.local_Bps)])
        s, d = copies.src, copies.dst
        local = s == d
        p = np.stack([s, G + d, 2 * G + s, 2 * G + d], axis=1)
        p[local] = np.stack([3 * G + s[local], np.full(local.sum(), -1), np.full(local.sum(), -1),
                             np.full(local.sum(), -1)], axis=1)
        if fabric.duplex_Bps is None:
            p[~local, 2:] = -1
        self.ports = p
        self.active: list[int] = []  # copy ids moving bytes now
        self.remaining = copies.nbytes.astype(np.float64).copy()


def simulate(plans: Sequence[CopyPlan], fabric: Fabric, *, options: Mapping[str, Any] | None = None,
             starts: Sequence[float] | None = None, executor: str = "per_stream", arbitration: str = "fair",
             issue_order: str = "stream") -> SimResult:
    """Run every rank's copy plan through the fluid model.

    Parameters
    ----------
    plans : sequence of CopyPlan
        ``plans[r]`` is rank ``r``'s plan (``len(plans) == fabric.group_size``).
    fabric : Fabric
    options : mapping, optional
        Engine options (:func:`parse_options`), the same for every rank.
    starts : sequence of float, optional
        Each rank's start time in seconds (default all 0).
    executor : {"per_stream", "issue_fifo"}
    arbitration : {"fair", "fifo"}
        ``per_stream`` only: how readers of one source share it.
    issue_order : {"stream", "slot"}
        ``issue_fifo`` only: the host loop's order, rank by rank (``stream``) or slot by slot.

    Returns
    -------
    SimResult
    """
    G = fabric.group_size
    if len(plans) != G:
        raise bad_arg("plans", f"{len(plans)} plans", f"one per rank ({G})")
    if executor not in EXECUTORS:
        raise bad_arg("executor", executor, f"one of {list(EXECUTORS)}")
    if arbitration not in ARBITRATIONS:
        raise bad_arg("arbitration", arbitration, f"one of {list(ARBITRATIONS)}")
    if issue_order not in ("stream", "slot"):
        raise bad_arg("issue_order", issue_order, "'stream' or 'slot'")
    opts = parse_options(options)
    st = np.zeros(G) if starts is None else np.asarray(starts, dtype=np.float64)
    if st.shape != (G,) or not np.all(np.isfinite(st)) or np.any(st < 0):
        raise bad_arg("starts", starts, f"{G} finite times >= 0")
    copies = _Copies(plans, G, opts, fabric.max_streams)
    rec = np.zeros(copies.n, dtype=_REC)
    rec["rank"], rec["lane"], rec["src"] = copies.rank, copies.lane, copies.src
    rec["slot"], rec["nbytes"] = copies.slot, copies.nbytes
    rec["t_issue"] = rec["t_data"] = rec["t_end"] = np.nan
    if executor == "issue_fifo":
        if opts["api"] != "memcpy" or opts["sync"] != "none":
            raise bad_arg("options", opts, "api='memcpy', sync='none' with executor='issue_fifo'",
                          "the one-process harness only issues single copies")
        _IssueFifo(fabric, copies, rec, st, issue_order).run()
    else:
        _PerStream(fabric, copies, rec, st, opts, arbitration).run()
    ends = st.copy()
    if copies.n:
        np.maximum.at(ends, copies.rank, rec["t_end"])
    return SimResult(starts=st, ends=ends, records=rec,
                     info={"executor": executor, "arbitration": arbitration, "issue_order": issue_order,
                           "options": opts, "fabric": fabric.name})


_EPS_T = 1e-12


class _Loop:
    """Shared event loop: timers in a heap, transfers advanced by their max-min rates."""

    def __init__(self, fabric: Fabric, copies: _Copies, rec: np.ndarray, starts: np.ndarray):
        self.f, self.c, self.rec, self.starts = fabric, copies, rec, starts
        self.flows = _Flows(fabric, copies)
        self.t = 0.0
        self.timers: list[tuple[float, int, Any]] = []
        self._seq = 0
        self.done = np.zeros(copies.n, dtype=bool)
        self.num_done = 0
        self._last_act: list[int] | None = None
        self._last_rates = np.zeros(0)

    def at(self, when: float, what: Any) -> None:
        self._seq += 1
        heapq.heappush(self.timers, (max(when, self.t), self._seq, what))

    def start_transfer(self, i: int) -> None:
        self.rec["t_data"][i] = self.t
        if self.c.nbytes[i] == 0:
            self.finish(i)
        else:
            self.flows.active.append(i)
            self.on_transfer_registered(i)

    def run(self) -> None:
        self.setup()
        stall = 0
        while self.num_done < self.c.n:
            act = list(self.moving())
            if act != self._last_act:  # rates depend only on which transfers move
                self._last_rates = maxmin_rates(self.flows.ports[act], self.flows.caps) if act else np.zeros(0)
                self._last_act = act
            rates = self._last_rates
            t_next = self.timers[0][0] if self.timers else math.inf
            if act:
                rem = self.flows.remaining[act]
                with np.errstate(divide="ignore"):
                    fin = np.where(rates > 0, rem / np.where(rates > 0, rates, 1.0), np.inf)
                dt_x = float(fin.min())
            else:
                dt_x = math.inf
            dt = min(t_next - self.t, dt_x)
            if not math.isfinite(dt):
                raise RuntimeError(f"model deadlock at t={self.t:.6g}s: {self.c.n - self.num_done} copies left "
                                   "(a sync wait that can never be satisfied?)")
            dt = max(dt, 0.0)
            if act:
                self.flows.remaining[act] -= rates * dt
            self.t += dt
            finished = []
            if act:
                tol = np.maximum(1.0, 1e-9 * self.c.nbytes[act])
                finished = [act[k] for k in np.nonzero(self.flows.remaining[act] <= tol)[0].tolist()]
                if dt == dt_x and not finished:  # rounding: finish the earliest
                    finished = [act[int(np.argmin(fin))]]
            for i in finished:
                self.flows.remaining[i] = 0.0
                self.flows.active.remove(i)
                self.finish(i)
            while self.timers and self.timers[0][0] <= self.t + _EPS_T:
                _, _, what = heapq.heappop(self.timers)
                self.on_timer(what)
            stall = stall + 1 if dt == 0 and not finished else 0
            if stall > 10 * (self.c.n + 10):
                raise RuntimeError("model made no progress (internal error)")

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
        """Copies whose bytes move now (all registered transfers, unless arbitration queues them)."""
        return self.flows.active


class _PerStream(_Loop):
    """Each lane runs its ops in order: [wait] overhead transfer ... (see module docstring)."""

    def __init__(self, fabric, copies, rec, starts, opts, arbitration):
        super().__init__(fabric, copies, rec, starts)
        self.opts, self.arb = opts, arbitration
        self.ops = [self._lane_ops(cs) for cs in copies.lane_copies]
        self.pc = [0] * copies.num_lanes  # next op of each lane
        self.blocked: dict[tuple, list[int]] = {}  # wait key -> lanes
        G = fabric.group_size
        # slot bookkeeping for sync
        nslot = int(copies.slot.max()) + 1 if copies.n else 0
        self.slot_left = np.bincount(copies.slot, minlength=nslot).astype(np.int64) if copies.n else np.zeros(0, np.int64)
        self.low_slot, self.low_slot_time = 0, [0.0]  # all slots < low_slot done; time each became so
        self.src_left = np.zeros((G, max(nslot, 1)), dtype=np.int64)
        if copies.n:
            np.add.at(self.src_left, (copies.src, copies.slot), 1)
        self.low_src = [0] * G
        self.low_src_time: list[list[float]] = [[0.0] for _ in range(G)]
        self._advance_slots()
        self.queues: dict[int, deque] = {s: deque() for s in range(G)}

    # ops: ("d", seconds) delay, ("w", key) wait, ("x", copy) transfer
    def _lane_ops(self, cs: list[int]) -> list[tuple]:
        f, o, c = self.f, self.opts, self.c
        ops: list[tuple] = []
        prev_key, first = None, True
        for i in cs:
            key = None
            if o["sync"] == "slot":
                key = ("slot", int(c.slot[i]))
            elif o["sync"] == "source":
                key = ("src", int(c.src[i]), int(c.slot[i]))
            new_segment = first
            if key is not None and key != prev_key:
                ops.append(("w", key))
                new_segment = True  # a batch cannot span a wait
            prev_key, first = key, False
            if o["api"] == "batch":
                if new_segment:
                    ops.append(("d", f.batch_call_overhead_s))
                ops.append(("d", f.batch_copy_overhead_s))
            else:
                ops.append(("d", f.copy_overhead_s))
            ops.append(("x", i))
        return ops

    def moving(self) -> list[int]:
        if self.arb == "fair":
            return self.flows.active
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
        while self.pc[lane] < len(ops):
            op = ops[self.pc[lane]]
            self.pc[lane] += 1
            if op[0] == "d":
                self._mark_issue(lane)
                if op[1] > 0:
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
                self._mark_issue(lane, op[1])
                self.start_transfer(op[1])
                return

    def _mark_issue(self, lane: int, i: int | None = None) -> None:
        # t_issue of a copy = when its first overhead op began
        if i is None:
            nxt = next((op[1] for op in self.ops[lane][self.pc[lane]:] if op[0] == "x"), None)
            if nxt is not None and math.isnan(self.rec["t_issue"][nxt]):
                self.rec["t_issue"][nxt] = self.t
        elif math.isnan(self.rec["t_issue"][i]):
            self.rec["t_issue"][i] = self.t

    def _satisfied(self, key) -> float | None:
        if key[0] == "slot":
            k = key[1]
            return self.low_slot_time[k] if self.low_slot >= k else None
        s, k = key[1], key[2]
        return self.low_src_time[s][k] if self.low_src[s] >= k else None

    def _advance_slots(self) -> None:
        n = self.slot_left.shape[0]
        while self.low_slot < n and self.slot_left[self.low_slot] == 0:
            self.low_slot += 1
            self.low_slot_time.append(self.t)
        for s in range(self.f.group_size):
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
        self.slot_left[c.slot[i]] -= 1
        self.src_left[c.src[i], c.slot[i]] -= 1
        self._advance_slots()
        if self.blocked:
            ready = [k for k in self.blocked if self._satisfied(k) is not None]
            for k in ready:
                for lane in self.blocked.pop(k):
                    self.at(self.t, ("go", lane))
        self.at(self.t, ("go", int(c.lane_id[i])))


class _IssueFifo(_Loop):
    """One queue per source GPU, in host issue order; the head waits for its stream predecessor."""

    def __init__(self, fabric, copies, rec, starts, issue_order):
        super().__init__(fabric, copies, rec, starts)
        c = copies
        if issue_order == "stream":
            order = np.lexsort((np.arange(c.n), c.rank))  # rank by rank, each plan in order
        else:
            order = np.lexsort((c.rank, c.slot))
        self.queue: dict[int, deque] = {s: deque() for s in range(fabric.group_size)}
        for i in order.tolist():
            self.queue[int(c.src[i])].append(i)
        self.pred = np.full(c.n, -1, dtype=np.int64)
        for cs in c.lane_copies:
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
