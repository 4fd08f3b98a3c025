"""The copy executor: copy plans on dedicated copy streams (plain, batch, graph, time-division
and inside-a-caller's-capture paths)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

from ...engine_options import SYNC_MODES
from ...errors import ClosedError, CollectiveMismatchError, GraphCaptureError, bad_arg
from ...lanes import copy_lanes, local_lane
from ...planner import CopyPlan
from ..base import Buffer, CopyEngine, Event
from .copies import MEMOP_DTYPE, MEMOP_MAX, DriverCopyCalls, issue_memops
from .driver import CudaError, check, load, log
from .memory import DeviceBuffer, MallocAlloc
from .streams import CudaEvent, CudaStream, stream_capture_id
from .time_division import SyncFlags, SyncProgram, build_sync_program

__all__ = ["CopyExecutor"]


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
    lane is plan order.

    **Time division** (``sync``). ``"slot"``: a lane starts the copies of plan slot ``k`` only once
    every rank finished every copy of slots ``< k``, so that each slot is a permutation even when
    ranks drift. ``"source"``: a copy of slot ``k`` from source ``s`` waits only until every rank
    finished its copies from ``s`` of slots ``< k`` (the previous reader of ``s``). This is what
    :mod:`dwdp_comm.bench.model` models. Mechanism (:class:`SyncFlags`): flag words in symmetric
    memory; after its copies of a slot, a lane writes its progress into every rank's array
    (``cuStreamBatchMemOp`` write-value to the peer-mapped word, or an NVSHMEM signal), and before
    the copies of the next slot it waits on its own array (wait-value, cyclic ``>=``). Values grow
    monotonically with a per-engine job sequence number folded in, so no word is ever reset. Local
    copies take no part. Round robin, G = 3, rank 0, ``sync="slot"``::

        copy lane    [wait V(0) of all][slot 1: src 2][write V(1) -> all][wait V(1)][slot 2: src 1]...
        local lane   [local copies ........]
        compute      --- layer l --- wait(done event of the prefetch) --- layer l+1 ---
        flag array   word (writer w, lane l) on every rank: V(j, k) = j * 2**32 + k + 1

    Copies within a slot use ``api`` (``"batch"``: one ``cudaMemcpyBatchAsync`` per slot and lane).
    Lanes are issued slot by slot (slot-major), and local copies first: streams beyond the hardware
    queues (``CUDA_DEVICE_MAX_CONNECTIONS``) share a queue in issue order, and a wait must never sit
    in a queue ahead of a write it depends on. A compute stream that shares a queue with a waiting
    lane is delayed by it; keep ``streams`` small with ``sync``.

    A sync engine is **collective**: creating it allocates the flags collectively (and tests them
    with a handshake), and closing it frees them collectively. Every rank must submit the same
    sequence of jobs (job ``j`` of every rank belongs together; plans may differ, an empty plan is
    fine: it writes "done" at once). A rank that submits fewer jobs leaves its peers' copy streams
    waiting (their done events do not complete). ``close()`` gathers the job counts, releases such
    streams and raises :class:`CollectiveMismatchError`; anything that synchronizes on those done
    events before ``close()`` (e.g. ``Prefetcher.close``) waits forever.

    **Graphs** (``graph=True``). The first job of a plan (by identity: the planner caches plans)
    into a destination (``src_base``, ``dst``, ``dst_base``) captures each lane's copies as a CUDA
    graph (stream capture of ``cudaMemcpyAsync``) and instantiates it; every job launches one graph
    per lane after the ``after`` waits. Executable graphs are cached (``graph_cache_size`` entries,
    least recently used dropped) and destroyed at close.

    **Inside a caller's CUDA graph capture** (``submit(capture=id)``, what the prefetcher passes
    when the consumer stream is capturing): the lanes fork from the capture through the ``after``
    events, every copy is a ``cuMemcpyAsync`` memcpy node (never the batch call, never a graph of
    the engine's own), and the done event joins them back. ``sync`` engines and unmapped sources
    refuse (:meth:`capture_refusal`).

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
        lane and job (per lane and slot with ``sync``; the driver may run a batch's copies in any
        order: the time-division order within the batch becomes a hint). When the batch call is
        unavailable or fails a test copy, the executor logs why and uses ``memcpy`` (``self.api``
        says which runs, ``self.api_reason`` why).
    distribute : {"source", "slot"}
    overlap_hint : bool
        ``batch`` only: set ``cudaMemcpyFlagPreferOverlapWithCompute``.
    sync : {"none", "slot", "source"}
        Time division on the copy plane (needs ``flags``).
    graph : bool
        Replay captured CUDA graphs (``api="memcpy"``, ``sync="none"``).
    flags : SyncFlags, optional
        Made by :func:`create_sync_flags` (collective) when ``sync != "none"``; the engine owns it.
    graph_cache_size : int
        Executable graphs kept (keys: plan, src_base, dst, dst_base).
    """

    def __init__(self, *, device: int, rank: int, group_size: int, src_ptrs: Sequence[int | None], src_nbytes: int,
                 remote_get: Callable | None = None, sym_ptr: int | None = None, streams: int = 1,
                 api: str = "batch", distribute: str = "source", overlap_hint: bool = False, sync: str = "none",
                 graph: bool = False, flags: SyncFlags | None = None, graph_cache_size: int = 256):
        rt, _ = load()
        self.device, self.rank, self.group_size = device, rank, group_size
        if len(src_ptrs) != group_size:
            raise bad_arg("src_ptrs", len(src_ptrs), f"{group_size} entries (one per rank)")
        if any(p is None for p in src_ptrs) and (remote_get is None or sym_ptr is None):
            raise bad_arg("remote_get", None, "a function and sym_ptr when some source has no peer mapping")
        if sync not in SYNC_MODES:
            raise bad_arg("sync", sync, f"one of {list(SYNC_MODES)}")
        if sync != "none" and (flags is None or flags.mode != sync or flags.num_lanes != streams
                               or flags.distribute != distribute or flags.rank != rank
                               or flags.group_size != group_size):
            raise bad_arg("flags", flags, f"the SyncFlags of this engine (create_sync_flags with sync={sync!r}, "
                          f"streams={streams}, distribute={distribute!r})")
        if graph and (api != "memcpy" or sync != "none"):
            raise bad_arg("graph", graph, "False unless api='memcpy' and sync='none'")
        if graph and any(p is None for p in src_ptrs):
            raise bad_arg("graph", graph, "False when some source has no peer mapping (NVSHMEM gets are not captured)")
        self._base = np.array([p or 0 for p in src_ptrs], dtype=np.int64)
        self._mapped = np.array([p is not None for p in src_ptrs], dtype=bool)
        self._src_nbytes = int(src_nbytes)
        self._remote_get, self._sym = remote_get, int(sym_ptr or 0)
        self.num_streams, self.distribute, self.sync, self.graph = streams, distribute, sync, bool(graph)
        self._flags = flags if sync != "none" else None
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
        self._programs: "OrderedDict[int, tuple[CopyPlan, SyncProgram]]" = OrderedDict()
        self._graphs: "OrderedDict[tuple, tuple[CopyPlan, dict]]" = OrderedDict()
        self.graph_cache_size = int(graph_cache_size)
        self.graphs_captured = 0
        self.captured_jobs = 0  # jobs recorded into a caller's CUDA graph capture (submit(capture=...))
        self.jobs = 0

    @property
    def local_lane(self) -> int:
        """Index of the lane of local copies (``src_rank == rank``) in :attr:`streams`."""
        return local_lane(self.num_streams)

    # -- batch support ------------------------------------------------------------------------------
    def _batch(self, stream: "CudaStream", dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray) -> None:
        d, s, n = (np.ascontiguousarray(a, dtype=np.uint64) for a in (dsts, srcs, sizes))
        err = self._drv.batch(d.ctypes.data, s.ctypes.data, n.ctypes.data, n.size, self._attrs_ptr,
                              self._attrs_idx.ctypes.data, 1, stream.handle)
        if err:
            raise self._drv.error(err, "cuMemcpyBatchAsync", f"{n.size} copies")

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
               after: Sequence[Event] = (), capture: int | None = None) -> CudaEvent:
        """Enqueue ``plan`` on the copy streams; return its done event at once (host never blocks).

        Parameters
        ----------
        capture : int, optional
            The id of the CUDA graph capture this job belongs to (see
            :func:`stream_capture_id`). Then every ``after`` event must have been recorded in that
            capture (at least one: the fork point), the copy streams join the capture by waiting on
            them, and every copy becomes a memcpy node (one ``cuMemcpyAsync`` each, whatever
            ``api`` and ``graph`` say: the batch call has no graph-node form). The done event is
            recorded in the capture; the consumer's wait on it joins the copy streams back.

        Raises
        ------
        InvalidArgumentError
            ``dst`` is not a buffer of this backend, an ``after`` entry is not a CUDA event, a copy
            would leave the source heap or the destination buffer, or (``sync``) the plan was made
            for another rank or group size or has too many slots (all checked before any copy).
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
                    f"(the fork point), got captures {[ev.capture for ev in after]}: copies ordered by nothing from the "
                    "capture would run outside the graph")
        elif any(ev.capture is not None for ev in after):
            raise GraphCaptureError("an eager copy job cannot wait on events recorded during a CUDA graph capture "
                                    f"(captures {sorted({ev.capture for ev in after if ev.capture is not None})})")
        if self._flags is not None:
            if plan.rank != self.rank or plan.group_size != self.group_size:
                raise bad_arg("plan", repr(plan), f"a plan made for rank {self.rank} of a group of {self.group_size} "
                              f"(sync={self.sync!r} pairs job j of every rank)")
            if plan.num_slots > self._flags.max_slots:
                raise bad_arg("plan", f"{plan.num_slots} slots", f"at most {self._flags.max_slots} slots with "
                              f"{self._flags.bits}-bit flags", "use larger chunks")
        keep = plan.nbytes > 0
        src_rank, src_off = plan.src_rank[keep], src_base + plan.src_offset[keep]
        dst_off, nbytes = dst_base + plan.dst_offset[keep], plan.nbytes[keep]
        slots = plan.slot[keep]
        if nbytes.size:
            self._check_bounds(src_rank, src_off, dst_off, nbytes, dst.nbytes)
        lanes = copy_lanes(src_rank, slots, rank=self.rank, group_size=self.group_size, streams=self.num_streams,
                           distribute=self.distribute)
        c = _Copies(self._base[src_rank] + src_off, dst.ptr + dst_off, nbytes, src_rank, src_off,
                    ~self._mapped[src_rank], lanes)
        if capture is not None:
            done = self._submit_captured(c, after, capture)
            self.captured_jobs += 1
        elif self._flags is not None:
            done = self._submit_sync(plan, slots, c, after)
        elif self.graph:
            done = self._submit_graph(plan, (int(src_base), int(dst.ptr), int(dst_base)), c, after)
        else:
            done = self._submit_plain(c, after)
        self.jobs += 1
        return done

    def _used(self, c: "_Copies") -> list[int]:
        """Lanes with copies, the local lane first (issue order); ``[0]`` for an empty job."""
        used = sorted(set(c.lane.tolist()), key=lambda ln: (ln != self.local_lane, ln))
        return used or [0]

    def _wait_after(self, lanes: Sequence[int], after: Sequence[CudaEvent]) -> None:
        rt, _ = load()
        for lane in lanes:
            for ev in after:
                check(rt.cudaStreamWaitEvent(self._streams[lane].raw, ev.raw, 0), "cudaStreamWaitEvent",
                      f"copy stream {lane} waiting for an 'after' event")

    def _join(self, lanes: Sequence[int], capture: int | None = None) -> CudaEvent:
        """Record the done event on the first of ``lanes`` after it waited for the others."""
        rt, _ = load()
        join = self._streams[lanes[0]]
        for lane in lanes[1:]:
            ev = CudaEvent().record(self._streams[lane].handle, capture)
            check(rt.cudaStreamWaitEvent(join.raw, ev.raw, 0), "cudaStreamWaitEvent", "joining copy streams")
        return CudaEvent().record(join.handle, capture)

    # -- CUDA graph capture -------------------------------------------------------------------------------
    def capture_refusal(self) -> str | None:
        """Why this engine cannot run a job inside a CUDA graph capture, or None when it can."""
        if self._flags is not None:
            return (f"copy engine option sync={self.sync!r} (time division) is not supported under CUDA graph "
                    "capture: its flag values change with every job, so a replay would wait on stale values; "
                    "use sync='none' for the prefetcher of a captured forward")
        if not self._mapped.all():
            return ("copies from peers without a peer mapping (NVSHMEM gets, other nodes) are not supported under "
                    "CUDA graph capture; capture only groups whose heaps are all peer-mapped")
        return None

    def _submit_captured(self, c: "_Copies", after: Sequence[CudaEvent], capture: int) -> CudaEvent:
        """Fork every used lane from the capture (waits on ``after``), check that it joined, issue
        its copies as memcpy nodes, and join the lanes into the done event (recorded in the capture)."""
        used = self._used(c)
        self._wait_after(used, after)
        for lane in used:
            got = stream_capture_id(self._streams[lane].handle)
            if got != capture:
                raise GraphCaptureError(f"copy stream {lane} did not join CUDA graph capture {capture} (it reports "
                                        f"{got}): its copies would run outside the graph")
        for lane in used:
            idx = np.flatnonzero(c.lane == lane)
            if idx.size:
                self._issue(self._streams[lane], c.take(idx), api="memcpy")
        return self._join(sorted(used), capture)

    def _submit_plain(self, c: "_Copies", after: Sequence[CudaEvent]) -> CudaEvent:
        used = self._used(c)
        self._wait_after(used, after)
        for lane in used:
            idx = np.flatnonzero(c.lane == lane)
            if idx.size:
                self._issue(self._streams[lane], c.take(idx))
        return self._join(sorted(used))

    # -- time division ----------------------------------------------------------------------------------
    def _program(self, plan: CopyPlan, slots: np.ndarray, c: "_Copies") -> SyncProgram:
        hit = self._programs.get(id(plan))
        if hit is not None and hit[0] is plan:
            self._programs.move_to_end(id(plan))
            return hit[1]
        remote = c.lane != self.local_lane
        prog = build_sync_program(self._flags, slots[remote], c.src_rank[remote], c.lane[remote])
        self._programs[id(plan)] = (plan, prog)  # holding the plan keeps its id unique
        while len(self._programs) > 64:
            self._programs.popitem(last=False)
        return prog

    def _submit_sync(self, plan: CopyPlan, slots: np.ndarray, c: "_Copies",
                     after: Sequence[CudaEvent]) -> CudaEvent:
        f = self._flags
        prog = self._program(plan, slots, c)
        prog.fill(f, self.jobs)
        job = self.jobs
        remote = c.take(np.flatnonzero(c.lane != self.local_lane))
        local = np.flatnonzero(c.lane == self.local_lane)
        used = sorted({st.lane for st in prog.steps})
        if local.size:  # first: nothing it does waits on a flag
            self._wait_after([self.local_lane], after)
            self._issue(self._streams[self.local_lane], c.take(local))
        for ln, (a, b), signals in prog.init:  # "done with the slots I have nothing in": before 'after'
            st = self._streams[ln]
            issue_memops(st.handle, prog.ops[a:b], f"lane {ln}: initial flag writes")
            self._signal(st, signals, job)
        self._wait_after(used, after)
        self._run_steps(prog, remote.take(prog.perm), job)
        lanes = used + ([self.local_lane] if local.size else [])
        if not lanes:  # nothing to copy: the done event still follows 'after'
            self._wait_after([0], after)
            lanes = [0]
        return self._join(lanes)

    def _run_steps(self, prog: SyncProgram, c: "_Copies", job: int) -> None:
        """Enqueue every step of ``prog`` (``c``: the remote copies in step order). The hot loop of a
        sync job: direct ctypes calls on precomputed offsets, about a microsecond per call."""
        memops, ops_ptr = self._drv.memops, int(prog.ops.ctypes.data)
        mode = "general" if c.remote.any() else self.api
        if mode == "batch":
            d, s, n = (np.ascontiguousarray(a, dtype=np.uint64) for a in (c.dst_addr, c.src_addr, c.nbytes))
            dp, sp, np_ = int(d.ctypes.data), int(s.ctypes.data), int(n.ctypes.data)
        elif mode == "memcpy":
            d, s, n, r = c.dst_addr.tolist(), c.src_addr.tolist(), c.nbytes.tolist(), c.src_rank.tolist()
            memcpy = self._drv.memcpy
        for st in prog.steps:
            stream = self._streams[st.lane]
            h = stream.handle
            self._memops(memops, h, ops_ptr, st.waits, f"lane {st.lane}: flag waits before slot {st.slot}")
            p, q = st.start, st.stop
            if mode == "batch":
                err = self._drv.batch(dp + 8 * p, sp + 8 * p, np_ + 8 * p, q - p, self._attrs_ptr,
                                      self._attrs_idx.ctypes.data, 1, h)
                if err:
                    raise self._drv.error(err, "cuMemcpyBatchAsync", f"{q - p} copies of slot {st.slot}")
            elif mode == "memcpy" and memcpy is not None:
                for i in range(p, q):
                    err = memcpy(d[i], s[i], n[i], h)
                    if err:
                        raise self._drv.error(err, "cuMemcpyAsync", f"{n[i]} bytes from rank {r[i]}'s heap "
                                              f"(0x{s[i]:x} -> 0x{d[i]:x})")
            else:  # NVSHMEM gets among the copies, or no ctypes memcpy: the general path
                self._issue(stream, c.take(slice(p, q)))
            self._memops(memops, h, ops_ptr, st.writes, f"lane {st.lane}: flag writes after slot {st.slot}")
            if st.signals:
                self._signal(stream, st.signals, job)

    def _memops(self, memops, stream: int, ops_ptr: int, span: tuple[int, int], what: str) -> None:
        """Enqueue ops ``[a, b)`` of a program (at ``ops_ptr``) on ``stream``, :data:`MEMOP_MAX` per call."""
        a, b = span
        for o in range(a, b, MEMOP_MAX):
            err = memops(stream, min(MEMOP_MAX, b - o), ops_ptr + MEMOP_DTYPE.itemsize * o, 0)
            if err:
                raise self._drv.error(err, "cuStreamBatchMemOp", what)

    def _signal(self, stream: CudaStream, signals: list, job: int) -> None:
        f = self._flags
        for sym_addr, rel, pe in signals:
            f.remote_signal(sym_addr, f.value(job, rel), pe, stream.handle)

    # -- graphs ------------------------------------------------------------------------------------------
    def _submit_graph(self, plan: CopyPlan, where: tuple, c: "_Copies", after: Sequence[CudaEvent]) -> CudaEvent:
        rt, _ = load()
        key = (id(plan), *where)
        hit = self._graphs.get(key)
        used = self._used(c) if len(c.lane) else []
        if hit is not None and hit[0] is plan:
            self._graphs.move_to_end(key)
            execs = hit[1]
        else:
            execs = {}
            try:
                for lane in used:
                    execs[lane] = self._capture(self._streams[lane], c.take(np.flatnonzero(c.lane == lane)))
            except BaseException:
                for ex in execs.values():
                    rt.cudaGraphExecDestroy(ex)
                raise
            self._graphs[key] = (plan, execs)  # holding the plan keeps its id unique
            self.graphs_captured += 1
            while len(self._graphs) > self.graph_cache_size:
                _, (_, old) = self._graphs.popitem(last=False)
                self._destroy_graphs(old)  # in-flight launches complete first (the driver frees later)
        lanes = used or [0]
        self._wait_after(lanes, after)
        for lane in used:
            check(rt.cudaGraphLaunch(execs[lane], self._streams[lane].raw), "cudaGraphLaunch",
                  f"copy stream {lane}, {int(np.count_nonzero(c.lane == lane))} copies")
        return self._join(sorted(lanes))

    def _capture(self, stream: CudaStream, c: "_Copies"):
        """Capture ``c``'s copies on ``stream`` into a graph; return its executable graph."""
        rt, _ = load()
        # Relaxed: nothing this thread might call meanwhile (a garbage-collected event's destroy) can
        # invalidate the capture; only this stream's copies are recorded.
        check(rt.cudaStreamBeginCapture(stream.raw, rt.cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed),
              "cudaStreamBeginCapture")
        try:
            self._issue(stream, c, api="memcpy")
        except BaseException:
            err, g = rt.cudaStreamEndCapture(stream.raw)  # leave capture mode; the error that matters is above
            if int(err) == 0 and g is not None and int(g):
                rt.cudaGraphDestroy(g)
            raise
        g = check(rt.cudaStreamEndCapture(stream.raw), "cudaStreamEndCapture")
        try:
            return check(rt.cudaGraphInstantiate(g, 0), "cudaGraphInstantiate", f"{len(c.nbytes)} memcpy nodes")
        finally:
            check(rt.cudaGraphDestroy(g), "cudaGraphDestroy")

    @staticmethod
    def _destroy_graphs(execs: dict) -> None:
        rt, _ = load()
        for ex in execs.values():
            check(rt.cudaGraphExecDestroy(ex), "cudaGraphExecDestroy")

    # -- issuing copies ----------------------------------------------------------------------------------
    def _check_bounds(self, src_rank, src_off, dst_off, nbytes, dst_nbytes: int) -> None:
        src_end, dst_end = src_off + nbytes, dst_off + nbytes
        bad = np.flatnonzero((src_off < 0) | (src_end > self._src_nbytes) | (dst_off < 0) | (dst_end > dst_nbytes))
        if bad.size:
            i = int(bad[0])
            raise bad_arg("plan", f"copy {i} reading [{int(src_off[i])}, {int(src_end[i])}) of rank "
                          f"{int(src_rank[i])}'s heap into [{int(dst_off[i])}, {int(dst_end[i])}) of dst",
                          f"ranges inside the heap ({self._src_nbytes} bytes) and dst ({dst_nbytes} bytes)")

    def _issue(self, stream: CudaStream, c: "_Copies", api: str | None = None) -> None:
        """Enqueue ``c``'s copies on ``stream`` in order (one batch call with ``api="batch"``)."""
        api = api or self.api
        if not len(c.nbytes):
            return
        if c.remote.any():
            # Sources without a peer mapping (other nodes): NVSHMEM gets, in plan order with the rest.
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

    @property
    def streams(self) -> list[int]:
        """Raw handles of the copy streams: the ``streams`` lanes, then the local lane."""
        return [s.handle for s in self._streams]

    @property
    def graphs_cached(self) -> int:
        """Executable-graph cache entries held now (at most ``graph_cache_size``)."""
        return len(self._graphs)

    @property
    def collective(self) -> bool:
        """True with ``sync``: creation and ``close`` are collective."""
        return self._flags is not None

    def _release_streams(self) -> None:
        """Destroy the cached graphs and the copy streams (what both close paths end with)."""
        for _, execs in self._graphs.values():
            self._destroy_graphs(execs)
        self._graphs.clear()
        self._programs.clear()
        for s in self._streams:
            s.close()

    def abort(self) -> None:
        """Release without waiting and without any collective step: copy streams are destroyed (CUDA
        frees them once their work is done; a ``sync`` stream waiting for a peer that never comes
        is leaked, not waited for) and the flag words released locally. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._release_streams()
        finally:
            if self._flags is not None and self._flags.owner is not None:
                self._flags.closed = True
                self._flags.owner.abort()

    def close(self) -> None:
        """Wait for submitted copies, then destroy graphs and copy streams. Collective with ``sync``:
        the job counts are compared (a mismatch raises :class:`CollectiveMismatchError` after the
        waiting streams were released) and the flags are freed."""
        if self._closed:
            return
        self._closed = True
        mismatch = None
        try:
            if self._flags is not None:
                mismatch = self._flags.settle(self.jobs, self._streams)
            else:
                for s in self._streams:
                    s.synchronize()
        except BaseException:
            # A peer missing from the job-count exchange broke the group: free the flag words
            # locally (the collective free would fail too and hide which rank was missing).
            self._closed = False
            self.abort()
            raise
        try:
            self._release_streams()
        finally:
            if self._flags is not None:
                self._flags.close()  # collective
        if mismatch:
            raise CollectiveMismatchError(mismatch)


class _Copies:
    """A job's copies as parallel arrays (addresses, sizes, sources, lanes)."""

    __slots__ = ("src_addr", "dst_addr", "nbytes", "src_rank", "src_off", "remote", "lane")

    def __init__(self, src_addr, dst_addr, nbytes, src_rank, src_off, remote, lane):
        self.src_addr, self.dst_addr, self.nbytes = src_addr, dst_addr, nbytes
        self.src_rank, self.src_off, self.remote, self.lane = src_rank, src_off, remote, lane

    def take(self, idx) -> "_Copies":
        return _Copies(*(getattr(self, k)[idx] for k in self.__slots__))
