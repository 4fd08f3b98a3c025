"""The telemetry clock of the GPU backends: CUDA timing events read against one anchor.

A point is a CUDA event created with timing enabled (``cudaEventDefault``; every other event of
the library disables timing, which makes it cheaper) and recorded on a stream. Reading it back
(:meth:`CudaTimer.seconds`) waits for it and converts ``cudaEventElapsedTime(anchor, point)`` to
host seconds: the anchor is an event recorded on an idle device at a known host time
(``time.perf_counter``), so every point lands on the host clock. The device and host clocks run
from one anchor without drift correction (ppm-level drift: microseconds over minutes), and
``cudaEventElapsedTime`` returns float milliseconds (about 0.5 us resolution, coarser after
~100 s from the anchor); durations are read directly between their two points
(:meth:`CudaTimer.elapsed`), so they keep the fine resolution.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from ...errors import bad_arg
from ...interop.streams import resolve_stream
from ..base import JobTiming, Timer
from .driver import CudaError, check, load

__all__ = ["CudaTimer", "LaneTimes"]

_POOL_MAX = 4096  # free events kept for reuse (creating one costs a few microseconds)


class CudaTimer(Timer):
    """Timing-event points on this process's current CUDA device.

    Creating it synchronizes the device once (host-blocking: not for the hot path; the backends
    create it on the first ``Backend.timer()`` call). ``anchor_s`` is the host time given to the
    anchor, within ``anchor_uncertainty_s`` of when the device recorded it. :meth:`mark` records a pooled event and never
    blocks; :meth:`seconds` and :meth:`elapsed` block until their points passed.
    """

    def __init__(self):
        rt, _ = load()
        self._pool: list = []
        check(rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize", "anchoring the telemetry clock")
        self._anchor = self._new()
        t0 = time.perf_counter()
        check(rt.cudaEventRecord(self._anchor, 0), "cudaEventRecord", "the telemetry clock's anchor")
        check(rt.cudaEventSynchronize(self._anchor), "cudaEventSynchronize", "the telemetry clock's anchor")
        t1 = time.perf_counter()
        # the device was idle: the record ran between the two host readings
        self.anchor_s, self.anchor_uncertainty_s = (t0 + t1) / 2, (t1 - t0) / 2

    @staticmethod
    def _new():
        rt, _ = load()
        return check(rt.cudaEventCreateWithFlags(rt.cudaEventDefault), "cudaEventCreateWithFlags",
                     "a timing event for telemetry")

    def mark(self, *, stream: Any = None):
        """A timing event recorded now on ``stream`` (any kind ``resolve_stream`` takes; None: the
        current torch stream). Non-blocking."""
        rt, _ = load()
        ev = self._pool.pop() if self._pool else self._new()
        s = resolve_stream(stream)
        check(rt.cudaEventRecord(ev, s), "cudaEventRecord", f"a telemetry point on stream 0x{s:x}")
        return ev

    def _elapsed_ms(self, a, b) -> float:
        rt, _ = load()
        check(rt.cudaEventSynchronize(b), "cudaEventSynchronize", "reading a telemetry point")
        return float(check(rt.cudaEventElapsedTime(a, b), "cudaEventElapsedTime", "reading a telemetry point"))

    def seconds(self, point) -> float:
        """Host ``perf_counter`` seconds at which ``point`` passed (blocks until it did)."""
        return self.anchor_s + self._elapsed_ms(self._anchor, point) / 1e3

    def elapsed(self, a, b) -> float:
        """Seconds from point ``a`` to point ``b`` (blocks until both passed)."""
        rt, _ = load()
        check(rt.cudaEventSynchronize(a), "cudaEventSynchronize", "reading a telemetry point")
        return self._elapsed_ms(a, b) / 1e3

    def is_done(self, point) -> bool:
        """True once ``point`` passed (``cudaEventQuery``; never blocks)."""
        rt, _ = load()
        err = rt.cudaEventQuery(point)[0]
        if err == rt.cudaError_t.cudaSuccess:
            return True
        if err == rt.cudaError_t.cudaErrorNotReady:
            return False
        raise CudaError("cudaEventQuery", err, "a telemetry point")

    def free(self, point) -> None:
        """Return a point that was read back to the pool (or destroy it beyond the pool's size)."""
        if len(self._pool) < _POOL_MAX:
            self._pool.append(point)
        else:
            rt, _ = load()
            rt.cudaEventDestroy(point)


class LaneTimes:
    """The copy executor's side of a timed job (``submit(..., timing=...)``): a point on each copy
    lane once its ``after`` waits are enqueued (:meth:`started`: before its first copy) and one
    when the lanes are joined (:meth:`ended`: after its last copy); :meth:`ended` then hands the
    job's :class:`JobTiming` each source's window: the window of its lane (of its lanes, when a
    source's copies are spread over several). Two points per used lane; the copies and their order
    are untouched.

    Parameters
    ----------
    timing : JobTiming
        Filled at :meth:`ended`; its ``timer`` records the points.
    streams : sequence
        The executor's lane streams (objects with a raw ``handle``), indexed by lane.
    src_rank, lane : numpy.ndarray
        The job's copies: source rank and lane of each (parallel ``int`` arrays).
    """

    __slots__ = ("timing", "streams", "src_rank", "lane", "starts", "ends")

    def __init__(self, timing: JobTiming, streams: Sequence[Any], src_rank: np.ndarray, lane: np.ndarray):
        if not isinstance(timing, JobTiming) or timing.timer is None:
            raise bad_arg("timing", timing, "a JobTiming made with the caller's timer (JobTiming(timer))")
        self.timing, self.streams = timing, streams
        self.src_rank, self.lane = np.asarray(src_rank), np.asarray(lane)
        self.starts: dict[int, Any] = {}
        self.ends: dict[int, Any] = {}

    def started(self, lanes: Sequence[int]) -> None:
        """Mark each of ``lanes`` (once per job: the first call counts) after its ``after`` waits."""
        for lane in lanes:
            if lane not in self.starts:
                self.starts[lane] = self.timing.timer.mark(stream=self.streams[lane].handle)

    def ended(self, lanes: Sequence[int]) -> None:
        """Mark each of ``lanes`` after the last work the job enqueued on it, then fill the JobTiming."""
        for lane in lanes:
            self.ends[lane] = self.timing.timer.mark(stream=self.streams[lane].handle)
        t, used = self.timing, sorted(set(self.starts) & set(self.ends))
        if not used:
            return
        t.start = tuple(self.starts[ln] for ln in used)
        t.end = tuple(self.ends[ln] for ln in used)
        for s in sorted(set(self.src_rank.tolist())):
            mine = sorted(set(self.lane[self.src_rank == s].tolist()) & set(used))
            if mine:
                t.add(s, tuple(self.starts[ln] for ln in mine), tuple(self.ends[ln] for ln in mine), None,
                      mine[0] if len(mine) == 1 else None)
