"""The ``sim`` backend: the whole DWDP pipeline on CPU processes.

It models the GPU backends' semantics rather than short-cutting them:

* The symmetric heap is one anonymous shared-memory file per rank (``memfd_create``: it never has a
  name, in ``/dev/shm`` or elsewhere, so no failure at any point can leave one behind), mapped by
  every rank (as CUDA IPC / NVSHMEM map peers' device memory): peers open it through
  ``/proc/<pid>/fd/<fd>`` of the owner, as the VMM backend passes file descriptors.
* Mappings outlive their buffers: ``close()`` drops the buffer's references, and the memory is
  unmapped when the last tensor viewing it goes (as device memory on the GPU backends), so a view
  kept past ``close()`` reads stale bytes instead of crashing the process.
* Each rank has one copy thread, its copy engine. ``submit`` returns at once; the thread waits for
  the job's ``after`` events, then copies the plan chunk by chunk, in plan order, and completes the
  job's event. An optional ``copy_bandwidth`` (bytes/s) slows it down to make asynchrony visible.
  ``source_bandwidth`` (an engine option) slows the copies from chosen source ranks only, to
  make one slow peer visible to the telemetry. With ``submit(..., timing=...)`` the thread records
  when the job and each source's copies ran (host ``perf_counter`` times: :class:`HostTimer`).
* Compute is host-synchronous, so the host is the only "stream": ``Event.wait()`` blocks the host,
  and an event recorded on the host (a release) is complete at once.
* Composite views map pieces of several shared-memory files into one reserved address range with
  ``mmap(MAP_FIXED)``, as the VMM backend maps local and slot pages into one device range. Pieces
  of the symmetric heap are mapped copy-on-write (``MAP_PRIVATE``): a write through a prefetched
  view stays in that view and never reaches the heap that peers read.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
import time
import uuid
from typing import Any, Sequence

import torch

from ..errors import ClosedError, DwdpError, bad_arg, gathered_error
from ..comm import describe
from ..planner import CopyPlan
from .base import Backend, Buffer, Composite, CopyEngine, Event, HostTimer, JobTiming, SymmetricHeap

__all__ = ["SimBackend"]

PAGE = mmap.PAGESIZE
_HOST_TIMER = HostTimer()
_PROT_NONE = getattr(mmap, "PROT_NONE", 0)
_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)  # Linux value; Python < 3.13 lacks the constant


class SimEvent(Event):
    """A host completion signal (``threading.Event``) that can carry the copy thread's error."""

    def __init__(self, done: bool = False):
        self._flag = threading.Event()
        self._error: BaseException | None = None
        if done:
            self._flag.set()

    def complete(self, error: BaseException | None = None) -> None:
        """Mark the event done (its waiters wake; with ``error`` they raise it). The sim copy
        engine calls this when a job ends; anything holding a host-side event may too."""
        self._error = error
        self._flag.set()

    def wait(self, *, stream: Any = None) -> None:
        """Block the host until done: the host is the only stream here, so ``stream`` (any value,
        accepted so that GPU code runs unchanged) is ignored."""
        self.synchronize()

    def synchronize(self) -> None:
        self._flag.wait()
        if self._error is not None:
            raise DwdpError(f"sim copy engine failed: {self._error!r}") from self._error

    @property
    def is_done(self) -> bool:
        return self._flag.is_set()


class _Mapping:
    """A mapped anonymous shared-memory file (a memfd of this process, or a peer's opened through
    ``/proc``). :meth:`close` drops this object's file descriptor and its reference to the mapping:
    the mapping itself goes with the last tensor or memoryview that uses it."""

    def __init__(self, fd: int, nbytes: int):
        self.nbytes, self.fd = nbytes, fd
        try:
            self.mm = mmap.mmap(fd, max(nbytes, PAGE))  # mmap refuses empty files
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create(cls, name: str, nbytes: int) -> "_Mapping":
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, max(nbytes, PAGE))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, nbytes)

    @classmethod
    def open_peer(cls, pid: int, fd: int, nbytes: int) -> "_Mapping":
        return cls(os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC), nbytes)

    def private_view(self, offset: int, nbytes: int) -> mmap.mmap:
        """A copy-on-write mapping of ``[offset, offset + nbytes)`` (``offset`` page-aligned)."""
        if self.fd is None:
            raise ClosedError("buffer used after close()")
        return mmap.mmap(self.fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=offset)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.mm = None  # unmapped when the last view goes: a view kept past close() stays readable


class SimBuffer(Buffer):
    """A local buffer in an anonymous shared-memory file (so it can be mapped into composites).

    ``private_views``: composites map its pieces copy-on-write (the heap's local part, which peers
    read), and :meth:`private_tensor` gives copy-on-write views."""

    def __init__(self, name: str, nbytes: int, boundaries: Sequence[int] = (), private_views: bool = False):
        self.nbytes = nbytes
        # Where composite pieces may start or end: checked as a GPU backend with whole-allocation
        # mappings would, so the CPU tests catch a caller that forgot to declare one.
        self.boundaries = frozenset([0, nbytes, *boundaries])
        self.private_views = private_views
        self._map = _Mapping.create(name, nbytes)
        self._closed = False

    def _check_range(self, offset: int, nbytes: int | None) -> int:
        if self._closed:
            raise ClosedError("buffer used after close()")
        nbytes = self.nbytes - offset if nbytes is None else nbytes
        if offset < 0 or nbytes < 0 or offset + nbytes > self.nbytes:
            raise bad_arg("offset/nbytes", (offset, nbytes), f"a range inside [0, {self.nbytes})")
        return nbytes

    def tensor(self, offset: int = 0, nbytes: int | None = None) -> torch.Tensor:
        nbytes = self._check_range(offset, nbytes)
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._map.mm, dtype=torch.uint8, count=nbytes, offset=offset)

    def private_tensor(self, offset: int = 0, nbytes: int | None = None) -> torch.Tensor:
        """A copy-on-write view: reads see the buffer, a write stays in the view."""
        nbytes = self._check_range(offset, nbytes)
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        start = offset - offset % PAGE
        mm = self._map.private_view(start, offset - start + nbytes)
        return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset - start)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._map.close()


class SimHeap(SymmetricHeap):
    """This rank's heap file plus every peer's, mapped. Collective to create and to close.

    Creation is one agreed step: every rank reports whether it could create its file and map every
    peer's, and all raise the same error when one could not (nothing is left behind: the files are
    anonymous, and a failed heap is released on every rank)."""

    def __init__(self, backend: "SimBackend", nbytes: int, boundaries: Sequence[int] = ()):
        comm = backend.comm
        self.nbytes = nbytes
        self._comm = comm
        self._closed = False
        self.local, self.peers = None, []
        err, cause, mine = None, None, None
        try:
            self.local = SimBuffer(f"dwdp-{backend.session}-heap{backend._next_id()}-r{comm.rank}", nbytes,
                                   boundaries=boundaries, private_views=True)
            mine = (os.getpid(), self.local._map.fd)
        except Exception as exc:
            err, cause = f"creating a {nbytes}-byte shared-memory heap: {describe(exc)}", exc
        try:
            everyone = comm.all_gather_object((err, mine), "sim: exchanging heap handles")
            failed = gathered_error([e for e, _ in everyone], "sim: creating the symmetric heap")
            if failed is not None:
                raise failed from cause
            err = None
            try:
                for r, (_, (pid, fd)) in enumerate(everyone):
                    self.peers.append(self.local._map if r == comm.rank else _Mapping.open_peer(pid, fd, nbytes))
            except Exception as exc:
                err, cause = f"mapping rank {r}'s heap (pid {pid}, fd {fd}): {describe(exc)}", exc
            # Also the point after which every rank holds its own descriptor of every file.
            comm.agree(err, "sim: mapping peers' heaps", cause=cause,
                       hint="the sim backend opens peers' memory through /proc/<pid>/fd (same user, Linux)")
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        for m in self.peers:
            if self.local is None or m is not self.local._map:
                m.close()
        self.peers = []
        if self.local is not None:
            self.local.close()

    def close(self) -> None:
        """Collective: wait until no peer reads this rank's memory, then release it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._comm.barrier("sim: closing the heap")  # no peer reads this rank's memory any more
        finally:
            self._release()

    def abort(self) -> None:
        """Release this rank's mappings now, without waiting for peers: the pages a peer still maps
        stay valid for it (the file lives until its last mapping goes)."""
        if not self._closed:
            self._closed = True
            self._release()


class SimCopyEngine(CopyEngine):
    """One host thread per rank that executes plans in submission order (a timed engine: lane 0)."""

    timed = True

    def __init__(self, heap: SimHeap, rank: int, copy_bandwidth: float | None, corrupt_copy: int | None = None,
                 source_bandwidth: dict[int, float] | None = None):
        self._heap, self._rank, self._bw = heap, rank, copy_bandwidth
        self._corrupt = corrupt_copy
        self._src_bw = dict(source_bandwidth or {})
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = self._aborted = False
        self._thread = threading.Thread(target=self._run, name=f"dwdp-sim-copy-r{rank}", daemon=True)
        self._thread.start()

    def submit(self, plan: CopyPlan, *, src_base: int, dst: Buffer, dst_base: int,
               after: Sequence[Event] = (), timing: JobTiming | None = None) -> Event:
        if self._closed:
            raise ClosedError("copy engine used after close()")
        if not isinstance(dst, SimBuffer):
            raise bad_arg("dst", type(dst).__name__, "a SimBuffer")
        if timing is not None and not isinstance(timing, JobTiming):
            raise bad_arg("timing", type(timing).__name__, "None or a dwdp_comm.backends.base.JobTiming")
        done = SimEvent()
        self._jobs.put((plan, src_base, dst, dst_base, tuple(after), done, timing))
        return done

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            plan, src_base, dst, dst_base, after, done, timing = job
            if self._aborted:
                done.complete(ClosedError("copy engine aborted before this job ran"))
                continue
            try:
                for ev in after:
                    ev.synchronize()
                if timing is not None:
                    timing.start = time.perf_counter()
                self._execute(plan, src_base, dst, dst_base, timing)
                if timing is not None:
                    timing.end = time.perf_counter()
            except BaseException as exc:  # report through the event, keep serving
                done.complete(exc)
            else:
                done.complete()

    def _execute(self, plan: CopyPlan, src_base: int, dst: SimBuffer, dst_base: int,
                 timing: JobTiming | None) -> None:
        spans: dict[int, list[float]] = {}  # source -> [first start, last end, busy seconds]
        with memoryview(dst._map.mm) as out:
            srcs = [memoryview(m.mm) for m in self._heap.peers]
            try:
                for i, (_slot, s, so, do, n) in enumerate(plan.copies()):
                    t0 = time.perf_counter()
                    a, b = src_base + so, dst_base + do
                    out[b:b + n] = srcs[s][a:a + n]
                    if i == self._corrupt and n:
                        out[b] = out[b] ^ 0xFF  # fault injection, for testing byte checkers
                    bw = min(self._bw or float("inf"), self._src_bw.get(s, float("inf")))
                    if bw != float("inf"):
                        time.sleep(max(0.0, n / bw - (time.perf_counter() - t0)))
                    if timing is not None:
                        t1 = time.perf_counter()
                        span = spans.setdefault(s, [t0, t1, 0.0])
                        span[1] = t1
                        span[2] += t1 - t0
            finally:
                for mv in srcs:
                    mv.release()
        if timing is not None:
            for s, (t0, t1, busy) in spans.items():
                timing.add(s, t0, t1, busy, lane=0)

    def close(self) -> None:
        """Run the jobs submitted so far, then stop the copy thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._thread.join()

    def abort(self) -> None:
        """Stop after the job running now; later jobs complete with :class:`ClosedError`."""
        self._aborted = True
        self.close()


class SimComposite(Composite):
    """Pieces of shared-memory files mapped back to back with ``mmap(MAP_FIXED)``."""

    _libc = None

    def __init__(self, pieces: Sequence[tuple[SimBuffer, int, int]]):
        libc = self._load_libc()
        total = sum(n for _, _, n in pieces)
        base = libc.mmap(None, total, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise DwdpError(f"mmap of a {total}-byte composite range failed: errno {ctypes.get_errno()}")
        pos = 0
        for buf, off, n in pieces:
            if n == 0:
                continue
            if buf._map.fd is None:
                libc.munmap(base, total)
                raise ClosedError("composite of a buffer used after close()")
            # Heap pages copy-on-write: a write through the view never reaches what peers read.
            share = mmap.MAP_PRIVATE if buf.private_views else mmap.MAP_SHARED
            got = libc.mmap(base + pos, n, mmap.PROT_READ | mmap.PROT_WRITE, share | _MAP_FIXED,
                            buf._map.fd, off)
            if got != base + pos:
                libc.munmap(base, total)
                raise DwdpError(f"mmap(MAP_FIXED) of a composite piece failed: errno {ctypes.get_errno()}")
            pos += n
        self._unmapper = _Unmapper(libc, base, total)
        arr = (ctypes.c_ubyte * total).from_address(base)
        arr._owner = self._unmapper  # the range lives as long as any tensor viewing it
        self._tensor = torch.frombuffer(arr, dtype=torch.uint8) if total else torch.empty(0, dtype=torch.uint8)

    @classmethod
    def _load_libc(cls):
        if cls._libc is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_long]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            cls._libc = libc
        return cls._libc

    def tensor(self) -> torch.Tensor:
        return self._tensor

    def close(self) -> None:
        self._tensor = None  # unmapped when no view is left


class _Unmapper:
    def __init__(self, libc, base: int, nbytes: int):
        self._libc, self._base, self._nbytes = libc, base, nbytes

    def __del__(self):
        self._libc.munmap(self._base, self._nbytes)


class SimBackend(Backend):
    """CPU backend: shared-memory heap, one copy thread per rank.

    Parameters
    ----------
    comm : dwdp_comm.comm.Comm
        The group's object exchange (collective calls go through it).
    copy_bandwidth : float, optional
        Bytes per second the copy thread may move (None: as fast as memcpy).
    """

    name = "sim"
    alloc_alignment = PAGE
    map_granularity = PAGE
    private_composites = True

    def __init__(self, comm, *, copy_bandwidth: float | None = None):
        if copy_bandwidth is not None and not copy_bandwidth > 0:
            raise bad_arg("copy_bandwidth", copy_bandwidth, "None or a number of bytes/s > 0")
        self.comm = comm
        self.device = torch.device("cpu")
        self.copy_bandwidth = copy_bandwidth
        self.session = comm.all_gather_object(uuid.uuid4().hex[:12], "sim: creating the backend")[0]
        self._ids = 0
        self._closed = False

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def alloc_symmetric(self, nbytes: int, boundaries: Sequence[int] = ()) -> SimHeap:
        return SimHeap(self, nbytes, boundaries)

    def alloc_buffer(self, nbytes: int, boundaries: Sequence[int] = ()) -> SimBuffer:
        return SimBuffer(f"dwdp-{self.session}-buf{self._next_id()}-r{self.comm.rank}", nbytes, boundaries=boundaries)

    def copy_engine(self, heap: SymmetricHeap, *, corrupt_copy: int | None = None,
                    source_bandwidth: dict[int, float] | None = None, **options: Any) -> SimCopyEngine:
        """The rank's copy thread. ``corrupt_copy=i`` flips one byte of copy ``i`` of every job
        (fault injection, to test byte checkers); ``source_bandwidth={src_rank: bytes/s}`` slows
        the copies from those ranks only (a slow peer, for telemetry tests); no other option
        exists on ``sim``."""
        if options:
            raise bad_arg("copy engine options", sorted(options),
                          "none on the sim backend except corrupt_copy and source_bandwidth")
        if source_bandwidth is not None:
            if not isinstance(source_bandwidth, dict) or not all(
                    isinstance(r, int) and not isinstance(r, bool) and 0 <= r < self.comm.size
                    and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                    for r, v in source_bandwidth.items()):
                raise bad_arg("source_bandwidth", source_bandwidth,
                              f"a dict {{src_rank in [0, {self.comm.size}): bytes/s > 0}}")
        return SimCopyEngine(heap, self.comm.rank, self.copy_bandwidth, corrupt_copy, source_bandwidth)

    def record_event(self, *, stream: Any = None) -> SimEvent:
        """A completed event: host work before this call has finished already. ``stream`` (any
        value, accepted so that GPU code runs unchanged) is ignored."""
        return SimEvent(done=True)  # host work before this call has finished already

    def timer(self) -> HostTimer:
        """Host ``perf_counter`` time points (compute is host-synchronous here)."""
        return _HOST_TIMER

    def compose(self, pieces: Sequence[tuple[Buffer, int, int]]) -> SimComposite:
        for buf, off, n in pieces:
            if not isinstance(buf, SimBuffer):
                raise bad_arg("pieces", type(buf).__name__, "SimBuffer pieces")
            if off % PAGE or n % PAGE:
                raise bad_arg("pieces", (off, n), f"offsets and sizes that are multiples of {PAGE}")
            if n and (off not in buf.boundaries or off + n not in buf.boundaries):
                raise bad_arg("pieces", (off, n), f"a range between the buffer's boundaries {sorted(buf.boundaries)}")
        return SimComposite(pieces)

    def synchronize(self) -> None:
        pass  # host compute is synchronous; copy jobs are waited through their events

    def close(self) -> None:
        """Local; idempotent."""
        self._closed = True


def probe() -> str | None:
    """The sim backend runs on Linux (``memfd_create``, ``/proc/<pid>/fd`` and ``mmap``)."""
    if os.name != "posix" or not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return "needs Linux (memfd_create, /proc/<pid>/fd and mmap)"
    return None
