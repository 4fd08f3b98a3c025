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
  handed from reader to reader of each source). Compute streams never wait in either. Copies
  from the rank itself take no part (as on the GPU).
* **Skew.** Each rank's copies may not begin before its start time (``starts``).

How it is computed (:func:`simulate`, ``method=``)
-------------------------------------------------
The **event simulation** (:mod:`.sim_events`) runs every copy of every rank: timers in a heap, a
max-min solve (:mod:`.maxmin`) whenever the set of moving transfers changes. It is the reference,
and its cost grows with the copies of the whole group (``G^2`` sources x chunks: 654K copies for
the full exchange at G = 72, 1 GiB per source, 8 MiB chunks; minutes). ``method="auto"`` (the
default) computes the same model more cheaply where it can (:func:`method_for`):

* the **rotation quotient** (:mod:`.sim_quotient`, exact): a symmetric exchange whose ranks start
  together is rank 0's exchange rotated, so rank 0's queues alone, sharing one processor, give
  every rank's times; its cost grows with one rank's copies;
* **coalesced runs** (:meth:`.sim_program.GroupCopies.coalesced`): the event simulation of runs of
  one lane's consecutive copies from one source, exact where the later copies of a run cost nothing
  to issue (``api="batch"``), approximate (within 2 % of the event simulation on the tested cases)
  for single copies with equal starts and ``G >= APPROX_MIN_GROUP``.

What is not modelled: HBM contention with compute, NVSwitch internals (a switch is assumed non
blocking), copy-engine counts and their time slicing, host issue cost (copies are assumed issued
ahead of the engines), launch jitter (the model is deterministic: ties stay tied).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..engine_options import parse_engine_options
from ..errors import bad_arg
from ..lanes import copy_lanes, hardware_queue
from ..planner import CopyPlan
from .fabric import Fabric, h200, nvl72  # the fabric description lives in bench/fabric.py
from .maxmin import maxmin_rates
from .sim_events import run_issue_fifo, run_per_stream
from .sim_program import REC, GroupCopies
from .sim_quotient import rotation_invariant, run_quotient

__all__ = ["Fabric", "h200", "nvl72", "EXECUTORS", "ARBITRATIONS", "METHODS", "APPROX_MIN_GROUP", "parse_options",
           "simulate", "method_for", "SimResult", "maxmin_rates", "pair_rate"]

EXECUTORS = ("per_stream", "issue_fifo")
ARBITRATIONS = ("fair", "fifo")


def parse_options(options: Mapping[str, Any] | None) -> dict:
    """Validate engine options for the model; return them with defaults filled in.

    The GPU executor's rule (:func:`dwdp_comm.engine_options.parse_engine_options`), except that
    ``api`` defaults to ``"memcpy"`` (single copies, as the calibration table was measured).
    Unknown names raise ``InvalidArgumentError`` naming them.
    """
    return parse_engine_options(options, "model", default_api="memcpy")


# ---- max-min fair rates (in .maxmin, imported here for callers of this module) ------------------
def pair_rate(fabric: Fabric, nbytes: int) -> float:
    """Bytes/s of one copy of ``nbytes`` between two idle GPUs, overhead included."""
    if nbytes <= 0:
        raise bad_arg("nbytes", nbytes, "an int > 0")
    return nbytes / (fabric.copy_overhead_s + nbytes / fabric.pair_Bps)


# ---- results --------------------------------------------------------------------------------------
class SimResult:
    """What :func:`simulate` returns.

    Attributes
    ----------
    starts, ends : numpy.ndarray
        ``float64 [G]``: each rank's start time and the end of its last copy (its start when it has
        none), in seconds.
    records : numpy.ndarray
        One row per copy (rank-major, plan order), structured: ``rank, lane`` (hardware queue),
        ``src, slot, nbytes, t_issue`` (overhead begins), ``t_data`` (bytes begin to move),
        ``t_end``. Built on first use where the method computed fewer units than copies (the
        rotation quotient: one rank's; coalesced runs: per-copy times split from each run's).
    info : dict
        ``executor``, ``arbitration``, ``issue_order``, ``options``, ``fabric``, and ``method``
        (how the result was computed: ``"event"``, ``"quotient"`` or ``"coalesced"``).
    """

    def __init__(self, starts: np.ndarray, ends: np.ndarray, records: np.ndarray | None = None,
                 info: dict | None = None, *, build_records: Callable[[], np.ndarray] | None = None):
        self.starts, self.ends, self.info = starts, ends, dict(info or {})
        self._records, self._build = records, build_records

    @property
    def records(self) -> np.ndarray:
        if self._records is None:
            self._records = self._build()
            self._build = None
        return self._records

    @property
    def durations(self) -> np.ndarray:
        """Each rank's own duration (end - its start)."""
        return self.ends - self.starts

    @property
    def makespan(self) -> float:
        """From the earliest start to the last end."""
        return float(self.ends.max() - self.starts.min())


# ---- simulation -----------------------------------------------------------------------------------
METHODS = ("auto", "event")


def simulate(plans: Sequence[CopyPlan], fabric: Fabric, *, options: Mapping[str, Any] | None = None,
             starts: Sequence[float] | None = None, executor: str = "per_stream", arbitration: str = "fair",
             issue_order: str = "stream", method: str = "auto") -> SimResult:
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
    method : {"auto", "event"}
        ``"event"``: the event simulation of every copy (:mod:`.sim_events`), the reference.
        ``"auto"`` (default): the cheapest computation of the same model (:func:`method_for`):
        the rotation quotient (exact) for symmetric exchanges, the event simulation of coalesced
        runs for other ``fair`` cases, the event simulation otherwise. ``info["method"]`` says which ran,
        ``info["exact"]`` whether it is the event simulation's result (up to rounding).

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
    if method not in METHODS:
        raise bad_arg("method", method, f"one of {list(METHODS)}")
    opts = parse_options(options)
    st = np.zeros(G) if starts is None else np.asarray(starts, dtype=np.float64)
    if st.shape != (G,) or not np.all(np.isfinite(st)) or np.any(st < 0):
        raise bad_arg("starts", starts, f"{G} finite times >= 0")
    if executor == "issue_fifo" and (opts["api"] != "memcpy" or opts["sync"] != "none"):
        raise bad_arg("options", opts, "api='memcpy', sync='none' with executor='issue_fifo'",
                      "the one-process harness only issues single copies")
    for r, p in enumerate(plans):
        if p.group_size != G or p.rank != r:
            raise bad_arg("plans", f"plan {r} (rank={p.rank}, group_size={p.group_size})",
                          f"plan i made for rank i of a group of {G}")
    how = "event" if method == "event" else method_for(plans, fabric, opts, st, executor, arbitration)
    info = {"executor": executor, "arbitration": arbitration, "issue_order": issue_order, "options": opts,
            "fabric": fabric.name, "method": how, "exact": how != "coalesced" or _inner_cost(opts, fabric) == 0}
    if how == "quotient":
        return _quotient(plans, fabric, opts, st, info)
    c = GroupCopies(plans, G, opts, fabric)
    units = c.coalesced() if how == "coalesced" else c
    rec = _empty_records(units)
    if executor == "issue_fifo":
        run_issue_fifo(fabric, units, rec, st, issue_order)
    else:
        run_per_stream(fabric, units, rec, st, arbitration)
    ends = st.copy()
    if units.n:
        np.maximum.at(ends, units.rank, rec["t_end"])
    if how == "coalesced":
        def build() -> np.ndarray:
            full = _empty_records(c)
            units.expand(rec, c, full)
            return full
        return SimResult(st, ends, info=info, build_records=build)
    return SimResult(st, ends, rec, info)


#: The smallest group where :func:`method_for` merges runs of copies that cost something to issue
#: (their costs moved to the run's start). Measured against the event simulation with equal starts
#: (``naive``, full exchange, 2-32 MiB chunks): 2.9 % at G = 3, under 1.5 % from G = 4, under
#: 0.4 % from G = 12; with skewed starts up to 9 % at G = 8, so never with skew.
APPROX_MIN_GROUP = 8


def method_for(plans: Sequence[CopyPlan], fabric: Fabric, opts: dict, starts: np.ndarray, executor: str,
               arbitration: str) -> str:
    """How ``simulate(method="auto")`` computes a case: ``"quotient"``, ``"coalesced"`` or ``"event"``.

    * ``"quotient"`` (exact): ``per_stream``, every rank starts at once and every plan is rank 0's
      rotated (:func:`~.sim_quotient.rotation_invariant`), with ``fair`` arbitration or one hardware
      queue per rank: rank 0's queues alone, with processor sharing (:mod:`.sim_quotient`).
    * ``"coalesced"``: other ``per_stream`` ``fair`` cases: the event simulation of runs of
      consecutive copies of one lane from one source (:meth:`GroupCopies.coalesced`). Exact where a
      run's later copies cost nothing to issue (``api="batch"``, whose per-copy cost is 0 on the
      calibrated fabrics); otherwise their costs move to the run's start, which is done only with
      equal starts and ``G >= APPROX_MIN_GROUP`` (``info["exact"]`` is then False).
    * ``"event"``: everything else (``issue_fifo``; ``fifo`` with several queues per rank or with
      ranks that do not mirror each other; small or skewed ``memcpy`` cases): every copy.
    """
    if executor != "per_stream":
        return "event"
    G = fabric.group_size
    equal = bool(np.ptp(starts) == 0)
    if equal and rotation_invariant(plans) and (arbitration == "fair" or _one_queue(plans[0], opts, fabric)):
        return "quotient"
    if arbitration != "fair":
        return "event"
    if _inner_cost(opts, fabric) == 0 or (equal and G >= APPROX_MIN_GROUP):
        return "coalesced"
    return "event"


def _inner_cost(opts: dict, fabric: Fabric) -> float:
    """Issue cost of a copy that follows another of its lane without a wait (what coalescing moves)."""
    return fabric.batch_copy_overhead_s if opts["api"] == "batch" else fabric.copy_overhead_s


def _one_queue(p: CopyPlan, opts: dict, fabric: Fabric) -> bool:
    """All of ``p``'s copies on one hardware queue: one transfer of the rank moves at a time."""
    lanes = hardware_queue(copy_lanes(p.src_rank, p.slot, rank=p.rank, group_size=p.group_size,
                                      streams=opts["streams"], distribute=opts["distribute"]),
                           streams=opts["streams"], max_queues=fabric.max_streams)
    return lanes.size == 0 or bool((lanes == lanes[0]).all())


def _empty_records(c: GroupCopies) -> np.ndarray:
    rec = np.zeros(c.n, dtype=REC)
    rec["rank"], rec["lane"], rec["src"] = c.rank, c.lane, c.src
    rec["slot"], rec["nbytes"] = c.slot, c.nbytes
    rec["t_issue"] = rec["t_data"] = rec["t_end"] = np.nan
    return rec


def _quotient(plans: Sequence[CopyPlan], fabric: Fabric, opts: dict, starts: np.ndarray, info: dict) -> SimResult:
    G = fabric.group_size
    c0 = GroupCopies(plans[:1], G, opts, fabric)
    times = run_quotient(fabric, c0, float(starts[0]))
    end = float(np.nanmax(times[2])) if c0.n else float(starts[0])
    ends = np.full(G, max(end, float(starts[0])))

    def build() -> np.ndarray:
        n = c0.n
        rec = np.zeros(G * n, dtype=REC)
        rank = np.repeat(np.arange(G, dtype=np.int64), n)
        rec["rank"] = rank
        rec["lane"] = np.tile(c0.lane, G)
        rec["src"] = (np.tile(c0.src, G) + rank) % G
        rec["slot"], rec["nbytes"] = np.tile(c0.slot, G), np.tile(c0.nbytes, G)
        for k, name in enumerate(("t_issue", "t_data", "t_end")):
            rec[name] = np.tile(times[k], G)
        return rec

    return SimResult(starts, ends, info=info, build_records=build)
