"""The copy executor: copy plans on dedicated copy streams, eagerly (one ``cuMemcpyAsync`` per copy,
or one ``cuMemcpyBatchAsync`` per lane and job) or inside a caller's CUDA graph capture.

Time division (``sync="slot"`` / ``"source"``) is a subclass of its own,
:class:`~.time_division.TimeDivisionExecutor`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ...errors import ClosedError, CollectiveMismatchError, GraphCaptureError, bad_arg
from ...lanes import copy_lanes, local_lane
from ...planner import CopyPlan
from ..base import Buffer, CopyEngine, Event, JobTiming
from .copies import DriverCopyCalls
from .driver import CudaError, check, load, log
from .memory import DeviceBuffer, MallocAlloc
from .streams import CudaEvent, CudaStream, stream_capture_id
from .timing import LaneTimes

__all__ = ["CopyExecutor", "JobCopies"]


class CopyExecutor(CopyEngine):
    """Runs copy plans on dedicated non-blocking copy streams with raw CUDA copies.

    Copy ``i`` of a plan reads ``src_ptrs[src_rank[i]] + src_base + src_offset[i]`` (a peer's heap
    as mapped into this process) and writes ``dst.ptr + dst_base + dst_offset[i]``. Nothing goes
    through torch (whose cross-device ``copy_`` adds cross-device stream syncs) and nothing blocks
    the host: a job makes its copy streams wait for its ``after`` events, issues the copies, and
    records one done event, which joins every stream the job used. Compute streams only ever wait
    on done events.

    **Lanes** (:func:`dwdp_comm.lanes.copy_lanes`, the rule the contention model uses too). Copies
    from peers run on ``streams`` lanes: with ``distribute="source"``,
    ``lane = ((src_rank - rank - 1) mod G) mod streams`` (each peer on its own lane when
    ``streams >= G - 1``), with ``distribute="slot"``, ``lane = slot mod streams``. Copies from this
    rank itself (``src_rank == rank``: local experts copied into the slot in gather mode, which the
    ``nvshmem`` backend always uses) never cross the fabric and always run on one extra lane of their
    own, so that they overlap the peers' copies instead of queueing behind them. Order within a
    lane is plan order; local copies are issued first.

    **Inside a caller's CUDA graph capture** (``submit(capture=id)``, what the prefetcher passes
    when the consumer stream is capturing): the lanes fork from the capture through the ``after``
    events, every copy is a ``cuMemcpyAsync`` memcpy node (never the batch call: it has no
    graph-node form), and the done event joins them back. Unmapped sources refuse
    (:meth:`capture_refusal`).

    **Subclasses** (:class:`~.time_division.TimeDivisionExecutor`) change what an eager job does by
    overriding :meth:`check_plan`, :meth:`enqueue` and the close hooks (:meth:`settle`,
    :meth:`release_collective`, :meth:`abort_collective`), and build on :meth:`wait_after`,
    :meth:`join`, :meth:`issue` and :meth:`batch_call`.

    Parameters
    ----------
    device : int
        This rank's GPU; the copy streams live on it (pull: the destination drives the copy).
    rank, group_size : int
    src_ptrs : list of int or None
        Base address of each rank's heap in this process; None where no peer mapping exists (then
        ``remote_get`` moves those copies).
    src_nbytes : int
        Size of each heap (bounds check).
    remote_get : callable, optional
        ``remote_get(dst_ptr, sym_src_ptr, nbytes, src_rank, stream_handle)`` for unmapped sources
        (NVSHMEM ``getmem_on_stream``), reading at ``sym_ptr + src_base + src_offset``.
    sym_ptr : int, optional
        The symmetric address of the heap (this rank's own address of it).
    streams : int
        Lanes for copies from peers (see above); local copies get one more.
    api : {"memcpy", "batch"}
        ``memcpy``: one ``cudaMemcpyAsync`` per copy. ``batch``: one ``cudaMemcpyBatchAsync`` per
        lane and job (the driver may run a batch's copies in any order). When the batch call is
        unavailable or fails a test copy, the executor logs why and uses ``memcpy`` (``self.api``
        says which runs, ``self.api_reason`` why).
    distribute : {"source", "slot"}
    overlap_hint : bool
        ``batch`` only: set ``cudaMemcpyFlagPreferOverlapWithCompute``.
    """

    #: Time division on the copy plane: ``"none"`` here, the mode in :class:`~.time_division.TimeDivisionExecutor`.
    sync = "none"
    timed, _lane_times = True, None  # submit(timing=): the LaneTimes of the eager job being submitted

    def __init__(self, *, device: int, rank: int, group_size: int, src_ptrs: Sequence[int | None], src_nbytes: int,
                 remote_get: Callable | None = None, sym_ptr: int | None = None, streams: int = 1,
                 api: str = "batch", distribute: str = "source", overlap_hint: bool = False):
        rt, _ = load()
        self.device, self.rank, self.group_size = device, rank, group_size
        if len(src_ptrs) != group_size:
            raise bad_arg("src_ptrs", len(src_ptrs), f"{group_size} entries (one per rank)")
        if any(p is None for p in src_ptrs) and (remote_get is None or sym_ptr is None):
            raise bad_arg("remote_get", None, "a function and sym_ptr when some source has no peer mapping")
        self._base = np.array([p or 0 for p in src_ptrs], dtype=np.int64)
        self._mapped = np.array([p is not None for p in src_ptrs], dtype=bool)
        self._src_nbytes = int(src_nbytes)
        self._remote_get, self._sym = remote_get, int(sym_ptr or 0)
        self.num_streams, self.distribute = streams, distribute
        self._closed = False
        self._streams = [CudaStream() for _ in range(streams + 1)]  # lanes 0..streams-1, then the local lane
        self._kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._ok = rt.cudaError_t.cudaSuccess
        self.api, self.api_reason = api, "requested"
        self._drv = DriverCopyCalls.get()
        if api == "batch":
            reason = self._probe_batch(overlap_hint)
            if reason is not None:
                log.warning("dwdp_comm: copy engine api='batch' unavailable, using 'memcpy': %s", reason)
                self.api, self.api_reason = "memcpy", reason
        self.captured_jobs = 0  # jobs recorded into a caller's CUDA graph capture (submit(capture=...))
        self.jobs = 0

    @property
    def local_lane(self) -> int:
        """Index of the lane of local copies (``src_rank == rank``) in :attr:`streams`."""
        return local_lane(self.num_streams)

    @property
    def lane_streams(self) -> list[CudaStream]:
        """The copy streams: the ``streams`` lanes, then the local lane (for subclasses)."""
        return list(self._streams)

    @property
    def streams(self) -> list[int]:
        """Raw handles of the copy streams: the ``streams`` lanes, then the local lane."""
        return [s.handle for s in self._streams]

    @property
    def collective(self) -> bool:
        """True where creation and ``close`` are collective (time division)."""
        return False

    # -- batch support ------------------------------------------------------------------------------
    def batch_call(self, stream: int, dsts_ptr: int, srcs_ptr: int, sizes_ptr: int, count: int, what: str) -> None:
        """One ``cuMemcpyBatchAsync`` of ``count`` copies on the raw ``stream`` handle, from ``uint64``
        arrays at the given addresses (every copy with this engine's attributes); raises
        :class:`CudaError` naming ``what``."""
        err = self._drv.batch(dsts_ptr, srcs_ptr, sizes_ptr, count, self._attrs_ptr, self._attrs_idx.ctypes.data, 1,
                              stream)
        if err:
            raise self._drv.error(err, "cuMemcpyBatchAsync", what)

    def _batch(self, stream: CudaStream, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray) -> None:
        d, s, n = (np.ascontiguousarray(a, dtype=np.uint64) for a in (dsts, srcs, sizes))
        self.batch_call(stream.handle, d.ctypes.data, s.ctypes.data, n.ctypes.data, n.size, f"{n.size} copies")

    def _probe_batch(self, overlap_hint: bool) -> str | None:
        """Set up the batch attributes and run a two-copy test batch; why not, or None."""
        if self._drv.batch is None:
            return "the driver has no cuMemcpyBatchAsync at the CUDA 13 ABI"
        self._attrs, self._attrs_ptr = self._drv.batch_attributes(overlap_hint)
        self._attrs_idx = np.zeros(1, dtype=np.uint64)
        scratch = MallocAlloc(4096, self.device)
        try:
            s = self._streams[0]
            p = scratch.ptr
            self._batch(s, np.array([p + 2048, p + 3072]), np.array([p, p + 1024]), np.array([256, 256]))
            s.synchronize()
        except Exception as exc:  # TypeError for another signature, CudaError from the driver
            return f"a test batch failed: {type(exc).__name__}: {exc}"
        finally:
            scratch.free()
        return None

    # -- submit ---------------------------------------------------------------------------------------
    def submit(self, plan: CopyPlan, *, src_base: int, dst: Buffer, dst_base: int,
               after: Sequence[Event] = (), capture: int | None = None, timing: JobTiming | None = None) -> CudaEvent:
        """Enqueue ``plan`` on the copy streams; return its done event at once (host never blocks).

        Parameters
        ----------
        timing : JobTiming, optional
            Eager jobs: lane windows into it (:class:`~dwdp_comm.backends.cuda.timing.LaneTimes`).
        capture : int, optional
            The id of the CUDA graph capture this job belongs to (see
            :func:`stream_capture_id`). Then every ``after`` event must have been recorded in that
            capture (at least one: the fork point), the copy streams join the capture by waiting on
            them, and every copy becomes a memcpy node (one ``cuMemcpyAsync`` each, whatever
            ``api`` says: the batch call has no graph-node form). The done event is recorded in the
            capture; the consumer's wait on it joins the copy streams back.

        Raises
        ------
        InvalidArgumentError
            ``dst`` is not a buffer of this backend, an ``after`` entry is not a CUDA event, a copy
            would leave the source heap or the destination buffer, or :meth:`check_plan` refuses
            the plan (all checked before any copy).
        GraphCaptureError
            ``capture`` is given and this engine cannot capture (:meth:`capture_refusal`), an
            ``after`` event is not from that capture, or a copy stream failed to join it.
        """
        if self._closed:
            raise ClosedError("copy engine used after close()")
        if not isinstance(dst, DeviceBuffer):
            raise bad_arg("dst", type(dst).__name__, "a DeviceBuffer of this GPU backend")
        after = tuple(after)
        for ev in after:
            if not isinstance(ev, CudaEvent):
                raise bad_arg("after", type(ev).__name__, "CUDA events of this backend")
        if capture is not None:
            problem = self.capture_refusal()
            if problem is not None:
                raise GraphCaptureError(problem)
            if not after or any(ev.capture != capture for ev in after):
                raise GraphCaptureError(
                    f"a copy job inside CUDA graph capture {capture} needs 'after' events recorded in that capture "
                    f"(the fork point), got captures {[ev.capture for ev in after]}: copies ordered by nothing from "
                    "the capture would run outside the graph")
        elif any(ev.capture is not None for ev in after):
            raise GraphCaptureError("an eager copy job cannot wait on events recorded during a CUDA graph capture "
                                    f"(captures {sorted({ev.capture for ev in after if ev.capture is not None})})")
        self.check_plan(plan)
        keep = plan.nbytes > 0
        src_rank, src_off = plan.src_rank[keep], src_base + plan.src_offset[keep]
        dst_off, nbytes = dst_base + plan.dst_offset[keep], plan.nbytes[keep]
        slots = plan.slot[keep]
        if nbytes.size:
            self._check_bounds(src_rank, src_off, dst_off, nbytes, dst.nbytes)
        lanes = copy_lanes(src_rank, slots, rank=self.rank, group_size=self.group_size, streams=self.num_streams,
                           distribute=self.distribute)
        c = JobCopies(self._base[src_rank] + src_off, dst.ptr + dst_off, nbytes, src_rank, src_off,
                      ~self._mapped[src_rank], lanes, slots)
        self._lane_times = LaneTimes(timing, self._streams, src_rank, lanes) if timing and capture is None else None
        if capture is not None:
            done = self._submit_captured(c, after, capture)
            self.captured_jobs += 1
        else:
            done = self.enqueue(plan, c, after)
        self.jobs, self._lane_times = self.jobs + 1, None
        return done

    def check_plan(self, plan: CopyPlan) -> None:
        """Refuse a plan this engine cannot run, before anything is enqueued (subclasses; none here)."""

    def enqueue(self, plan: CopyPlan, c: "JobCopies", after: Sequence[CudaEvent]) -> CudaEvent:
        """Enqueue an eager job's copies ``c`` (checked, lanes assigned) after ``after``; return its
        done event. Here: each used lane waits for ``after`` and issues its copies in plan order
        (the local lane first)."""
        used = self._used(c)
        self.wait_after(used, after)
        for lane in used:
            idx = np.flatnonzero(c.lane == lane)
            if idx.size:
                self.issue(self._streams[lane], c.take(idx))
        return self.join(sorted(used))

    def _used(self, c: "JobCopies") -> list[int]:
        """Lanes with copies, the local lane first (issue order); ``[0]`` for an empty job."""
        used = sorted(set(c.lane.tolist()), key=lambda ln: (ln != self.local_lane, ln))
        return used or [0]

    def wait_after(self, lanes: Sequence[int], after: Sequence[CudaEvent]) -> None:
        """Make each of ``lanes`` wait for every event of ``after``."""
        rt, _ = load()
        for lane in lanes:
            for ev in after:
                check(rt.cudaStreamWaitEvent(self._streams[lane].raw, ev.raw, 0), "cudaStreamWaitEvent",
                      f"copy stream {lane} waiting for an 'after' event")
        if self._lane_times is not None:
            self._lane_times.started(lanes)

    def join(self, lanes: Sequence[int], capture: int | None = None) -> CudaEvent:
        """Record the done event on the first of ``lanes`` after it waited for the others."""
        rt, _ = load()
        if self._lane_times is not None:
            self._lane_times.ended(lanes)
        first = self._streams[lanes[0]]
        for lane in lanes[1:]:
            ev = CudaEvent().record(self._streams[lane].handle, capture)
            check(rt.cudaStreamWaitEvent(first.raw, ev.raw, 0), "cudaStreamWaitEvent", "joining copy streams")
        return CudaEvent().record(first.handle, capture)

    # -- CUDA graph capture -------------------------------------------------------------------------------
    def capture_refusal(self) -> str | None:
        """Why this engine cannot run a job inside a CUDA graph capture, or None when it can."""
        if not self._mapped.all():
            return ("copies from peers without a peer mapping (NVSHMEM gets, other nodes) are not supported under "
                    "CUDA graph capture; capture only groups whose heaps are all peer-mapped")
        return None

    def _submit_captured(self, c: "JobCopies", after: Sequence[CudaEvent], capture: int) -> CudaEvent:
        """Fork every used lane from the capture (waits on ``after``), check that it joined, issue
        its copies as memcpy nodes, and join the lanes into the done event (recorded in the capture)."""
        used = self._used(c)
        self.wait_after(used, after)
        for lane in used:
            got = stream_capture_id(self._streams[lane].handle)
            if got != capture:
                raise GraphCaptureError(f"copy stream {lane} did not join CUDA graph capture {capture} (it reports "
                                        f"{got}): its copies would run outside the graph")
        for lane in used:
            idx = np.flatnonzero(c.lane == lane)
            if idx.size:
                self.issue(self._streams[lane], c.take(idx), api="memcpy")
        return self.join(sorted(used), capture)

    # -- issuing copies ----------------------------------------------------------------------------------
    def _check_bounds(self, src_rank, src_off, dst_off, nbytes, dst_nbytes: int) -> None:
        src_end, dst_end = src_off + nbytes, dst_off + nbytes
        bad = np.flatnonzero((src_off < 0) | (src_end > self._src_nbytes) | (dst_off < 0) | (dst_end > dst_nbytes))
        if bad.size:
            i = int(bad[0])
            raise bad_arg("plan", f"copy {i} reading [{int(src_off[i])}, {int(src_end[i])}) of rank "
                          f"{int(src_rank[i])}'s heap into [{int(dst_off[i])}, {int(dst_end[i])}) of dst",
                          f"ranges inside the heap ({self._src_nbytes} bytes) and dst ({dst_nbytes} bytes)")

    def issue(self, stream: CudaStream, c: "JobCopies", api: str | None = None) -> None:
        """Enqueue ``c``'s copies on ``stream`` in order (one batch call with ``api="batch"``;
        default: :attr:`api`). Copies from unmapped sources are NVSHMEM gets, in order with the rest."""
        api = api or self.api
        if not len(c.nbytes):
            return
        if c.remote.any():
            for d, s, n, r, so, rem in zip(c.dst_addr.tolist(), c.src_addr.tolist(), c.nbytes.tolist(),
                                           c.src_rank.tolist(), c.src_off.tolist(), c.remote.tolist()):
                if rem:
                    self._remote_get(d, self._sym + so, n, r, stream.handle)
                else:
                    self._memcpy(stream, d, s, n, r)
            return
        if api == "batch":
            self._batch(stream, c.dst_addr, c.src_addr, c.nbytes)
            return
        memcpy, st = self._drv.memcpy, stream.handle
        if memcpy is None:  # no ctypes entry point: the slower cuda.bindings call
            for d, s, n, r in zip(c.dst_addr.tolist(), c.src_addr.tolist(), c.nbytes.tolist(), c.src_rank.tolist()):
                self._memcpy(stream, d, s, n, r)
            return
        for d, s, n, r in zip(c.dst_addr.tolist(), c.src_addr.tolist(), c.nbytes.tolist(), c.src_rank.tolist()):
            err = memcpy(d, s, n, st)
            if err:
                raise self._drv.error(err, "cuMemcpyAsync", f"{n} bytes from rank {r}'s heap (0x{s:x} -> 0x{d:x})")

    def _memcpy(self, stream: CudaStream, d: int, s: int, n: int, r: int) -> None:
        rt, _ = load()
        err = rt.cudaMemcpyAsync(d, s, n, self._kind, stream.raw)[0]
        if err != self._ok:
            raise CudaError("cudaMemcpyAsync", err, f"{n} bytes from rank {r}'s heap (0x{s:x} -> 0x{d:x})")

    # -- closing -----------------------------------------------------------------------------------------
    def settle(self) -> str | None:
        """Wait for every submitted copy (the first step of :meth:`close`); a mismatch between ranks
        to report after the streams are released, or None. Collective in subclasses."""
        for s in self._streams:
            s.synchronize()
        return None

    def release_collective(self) -> None:
        """The collective release at the end of :meth:`close` (subclasses; nothing here)."""

    def abort_collective(self) -> None:
        """The local release of what :meth:`release_collective` frees (subclasses; nothing here)."""

    def _release_streams(self) -> None:
        for s in self._streams:
            s.close()

    def abort(self) -> None:
        """Release without waiting and without any collective step: copy streams are destroyed (CUDA
        frees them once their work is done; a stream waiting for a peer that never comes is leaked,
        not waited for). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._release_streams()
        finally:
            self.abort_collective()

    def close(self) -> None:
        """Wait for submitted copies (:meth:`settle`), then destroy the copy streams. A mismatch that
        :meth:`settle` reports raises :class:`CollectiveMismatchError` after the release."""
        if self._closed:
            return
        self._closed = True
        try:
            mismatch = self.settle()
        except BaseException:
            # A peer missing from a collective settle broke the group: release locally (a collective
            # release would fail too and hide which rank was missing).
            self._closed = False
            self.abort()
            raise
        try:
            self._release_streams()
        finally:
            self.release_collective()
        if mismatch:
            raise CollectiveMismatchError(mismatch)


class JobCopies:
    """One job's copies as parallel arrays, in plan order (zero-byte copies dropped).

    Attributes
    ----------
    src_addr, dst_addr : numpy.ndarray
        ``int64``: the addresses each copy reads (a peer mapping; unused for unmapped sources) and writes.
    nbytes, src_rank, src_off, lane, slot : numpy.ndarray
        ``int64``: size, source rank, offset in the source heap, lane, plan slot.
    remote : numpy.ndarray
        ``bool``: the source has no peer mapping (an NVSHMEM get moves it).
    """

    __slots__ = ("src_addr", "dst_addr", "nbytes", "src_rank", "src_off", "remote", "lane", "slot")

    def __init__(self, src_addr, dst_addr, nbytes, src_rank, src_off, remote, lane, slot):
        self.src_addr, self.dst_addr, self.nbytes = src_addr, dst_addr, nbytes
        self.src_rank, self.src_off, self.remote, self.lane, self.slot = src_rank, src_off, remote, lane, slot

    def take(self, idx) -> "JobCopies":
        """The copies at ``idx`` (an index array or a slice), in that order."""
        return JobCopies(*(getattr(self, k)[idx] for k in self.__slots__))
