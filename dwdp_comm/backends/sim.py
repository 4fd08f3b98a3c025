"""The ``sim`` backend: the whole DWDP pipeline on CPU processes.

It models the GPU backends' semantics rather than short-cutting them:

* The symmetric heap is one POSIX shared-memory file per rank, mapped by every rank (as CUDA IPC /
  NVSHMEM map peers' device memory). Files are unlinked as soon as every rank mapped them, so a
  crashed run leaves nothing behind in ``/dev/shm``.
* Each rank has one copy thread, its copy engine. ``submit`` returns at once; the thread waits for
  the job's ``after`` events, then copies the plan chunk by chunk, in plan order, and completes the
  job's event. An optional ``copy_bandwidth`` (bytes/s) slows it down to make asynchrony visible.
* Compute is host-synchronous, so the host is the only "stream": ``Event.wait()`` blocks the host,
  and an event recorded on the host (a release) is complete at once.
* Composite views map pieces of several shared-memory files into one reserved address range with
  ``mmap(MAP_FIXED)``, as the VMM backend maps local and slot pages into one device range.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import tempfile
import threading
import time
import uuid
from typing import Any, Sequence

import torch

from ..errors import ClosedError, DwdpError, bad_arg
from ..planner import CopyPlan
from .base import Backend, Buffer, Composite, CopyEngine, Event, SymmetricHeap

__all__ = ["SimBackend"]

PAGE = mmap.PAGESIZE
_PROT_NONE = getattr(mmap, "PROT_NONE", 0)
_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)  # Linux value; Python < 3.13 lacks the constant
_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _check_stream(stream: Any) -> None:
    if stream is not None:
        raise bad_arg("stream", stream, "None on the sim backend",
                      "compute is host-synchronous there; the host is the only stream")


class SimEvent(Event):
    """A host completion signal (``threading.Event``) that can carry the copy thread's error."""

    def __init__(self, done: bool = False):
        self._flag = threading.Event()
        self._error: BaseException | None = None
        if done:
            self._flag.set()

    def _complete(self, error: BaseException | None = None) -> None:
        self._error = error
        self._flag.set()

    def wait(self, stream: Any = None) -> None:
        _check_stream(stream)
        self.synchronize()

    def synchronize(self) -> None:
        self._flag.wait()
        if self._error is not None:
            raise DwdpError(f"sim copy engine failed: {self._error!r}") from self._error

    @property
    def is_done(self) -> bool:
        return self._flag.is_set()


class _Mapping:
    """An open, mapped shared-memory file."""

    def __init__(self, path: str, nbytes: int, create: bool):
        self.path, self.nbytes = path, nbytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        self.fd = os.open(path, flags, 0o600)
        size = max(nbytes, PAGE)  # mmap refuses empty files
        if create:
            os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass  # tensors still view it: the mapping is freed when the last view dies
        os.close(self.fd)


class SimBuffer(Buffer):
    """A local buffer in an unlinked shared-memory file (so it can be mapped into composites)."""

    def __init__(self, path: str, nbytes: int, create: bool = True, boundaries: Sequence[int] = ()):
        self.nbytes = nbytes
        # Where composite pieces may start or end: checked as a GPU backend with whole-allocation
        # mappings would, so the CPU tests catch a caller that forgot to declare one.
        self.boundaries = frozenset([0, nbytes, *boundaries])
        self._map = _Mapping(path, nbytes, create)
        self._closed = False

    def tensor(self, offset: int = 0, nbytes: int | None = None) -> torch.Tensor:
        if self._closed:
            raise ClosedError("buffer used after close()")
        nbytes = self.nbytes - offset if nbytes is None else nbytes
        if offset < 0 or nbytes < 0 or offset + nbytes > self.nbytes:
            raise bad_arg("offset/nbytes", (offset, nbytes), f"a range inside [0, {self.nbytes})")
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._map.mm, dtype=torch.uint8, count=nbytes, offset=offset)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._map.close()


class SimHeap(SymmetricHeap):
    def __init__(self, backend: "SimBackend", nbytes: int, boundaries: Sequence[int] = ()):
        comm = backend.comm
        self.nbytes = nbytes
        self._comm = comm
        path = os.path.join(_SHM_DIR, f"dwdp-{backend.session}-heap{backend._next_id()}-r{comm.rank}")
        self.local = SimBuffer(path, nbytes, create=True, boundaries=boundaries)
        paths = comm.all_gather_object(path)
        self.peers: list[_Mapping] = []
        for r, p in enumerate(paths):
            self.peers.append(self.local._map if r == comm.rank else _Mapping(p, nbytes, create=False))
        comm.barrier()  # every rank mapped every file: names can go
        self.local._map.unlink()
        self._closed = False

    def close(self) -> None:
        if self._closed:
            raise ClosedError("symmetric heap closed twice")
        self._closed = True
        self._comm.barrier()  # no peer reads this rank's memory any more
        for r, m in enumerate(self.peers):
            if r != self._comm.rank:
                m.close()
        self.local.close()


class SimCopyEngine(CopyEngine):
    """One host thread per rank that executes plans in submission order."""

    def __init__(self, heap: SimHeap, rank: int, copy_bandwidth: float | None, corrupt_copy: int | None = None):
        self._heap, self._rank, self._bw = heap, rank, copy_bandwidth
        self._corrupt = corrupt_copy
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"dwdp-sim-copy-r{rank}", daemon=True)
        self._thread.start()

    def submit(self, plan: CopyPlan, *, src_base: int, dst: Buffer, dst_base: int,
               after: Sequence[Event] = ()) -> Event:
        if self._closed:
            raise ClosedError("copy engine used after close()")
        if not isinstance(dst, SimBuffer):
            raise bad_arg("dst", type(dst).__name__, "a SimBuffer")
        done = SimEvent()
        self._jobs.put((plan, src_base, dst, dst_base, tuple(after), done))
        return done

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            plan, src_base, dst, dst_base, after, done = job
            try:
                for ev in after:
                    ev.synchronize()
                self._execute(plan, src_base, dst, dst_base)
            except BaseException as exc:  # report through the event, keep serving
                done._complete(exc)
            else:
                done._complete()

    def _execute(self, plan: CopyPlan, src_base: int, dst: SimBuffer, dst_base: int) -> None:
        with memoryview(dst._map.mm) as out:
            srcs = [memoryview(m.mm) for m in self._heap.peers]
            try:
                for i, (_slot, s, so, do, n) in enumerate(plan.copies()):
                    t0 = time.perf_counter()
                    a, b = src_base + so, dst_base + do
                    out[b:b + n] = srcs[s][a:a + n]
                    if i == self._corrupt and n:
                        out[b] = out[b] ^ 0xFF  # fault injection, for testing byte checkers
                    if self._bw:
                        time.sleep(max(0.0, n / self._bw - (time.perf_counter() - t0)))
            finally:
                for mv in srcs:
                    mv.release()

    def close(self) -> None:
        if self._closed:
            raise ClosedError("copy engine closed twice")
        self._closed = True
        self._jobs.put(None)
        self._thread.join()


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
            got = libc.mmap(base + pos, n, mmap.PROT_READ | mmap.PROT_WRITE,
                            mmap.MAP_SHARED | _MAP_FIXED,
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
    comm : dwdp_comm.group.Comm
        The group's object exchange (collective calls go through it).
    copy_bandwidth : float, optional
        Bytes per second the copy thread may move (None: as fast as memcpy).
    """

    name = "sim"
    alloc_alignment = PAGE
    map_granularity = PAGE

    def __init__(self, comm, *, copy_bandwidth: float | None = None):
        if copy_bandwidth is not None and not copy_bandwidth > 0:
            raise bad_arg("copy_bandwidth", copy_bandwidth, "None or a number of bytes/s > 0")
        self.comm = comm
        self.device = torch.device("cpu")
        self.copy_bandwidth = copy_bandwidth
        self.session = comm.all_gather_object(uuid.uuid4().hex[:12])[0]
        self._ids = 0
        self._closed = False

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def alloc_symmetric(self, nbytes: int, boundaries: Sequence[int] = ()) -> SimHeap:
        return SimHeap(self, nbytes, boundaries)

    def alloc_buffer(self, nbytes: int, boundaries: Sequence[int] = ()) -> SimBuffer:
        path = os.path.join(_SHM_DIR, f"dwdp-{self.session}-buf{self._next_id()}-r{self.comm.rank}")
        buf = SimBuffer(path, nbytes, create=True, boundaries=boundaries)
        buf._map.unlink()  # anonymous from now on; the fd keeps it mappable
        return buf

    def copy_engine(self, heap: SymmetricHeap, *, corrupt_copy: int | None = None,
                    **options: Any) -> SimCopyEngine:
        """The rank's copy thread. ``corrupt_copy=i`` flips one byte of copy ``i`` of every job
        (fault injection, to test byte checkers); no other option exists on ``sim``."""
        if options:
            raise bad_arg("copy engine options", sorted(options), "none on the sim backend except corrupt_copy")
        return SimCopyEngine(heap, self.comm.rank, self.copy_bandwidth, corrupt_copy)

    def record_event(self, stream: Any = None) -> SimEvent:
        _check_stream(stream)
        return SimEvent(done=True)  # host work before this call has finished already

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
        if self._closed:
            raise ClosedError("backend closed twice")
        self._closed = True


def probe() -> str | None:
    """The sim backend runs wherever POSIX shared memory and ``mmap`` do."""
    if os.name != "posix":
        return "needs a POSIX system (shared memory files and mmap)"
    return None
