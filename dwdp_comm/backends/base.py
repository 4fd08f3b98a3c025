"""The interface every heap backend implements.

A backend owns four kinds of objects, all made by factories on :class:`Backend`:

* :class:`Buffer`: a region of this rank's memory (host shared memory on ``sim``, device memory on
  the GPU backends) with zero-copy ``uint8`` tensor views.
* :class:`SymmetricHeap`: one buffer per rank, same size and layout on every rank, whose peers'
  copies this rank can read with its copy engine (collective to create and to free).
* :class:`CopyEngine`: runs a :class:`~dwdp_comm.planner.CopyPlan` from the heap into a buffer,
  asynchronously, after a list of events, and returns the event of its completion.
* :class:`Event`: a completion signal. ``wait(stream)`` makes a consumer wait for it (a device
  stream on GPU backends; the calling host thread on ``sim``, where compute is host-synchronous).
* :class:`Timer` (telemetry): marks time points on a stream without blocking and reads them back
  later as seconds on the host clock; a copy engine with ``timed = True`` reports when the copies
  of a job ran into a :class:`JobTiming` (``submit(..., timing=...)``).

The store and the prefetcher are written against these classes only, so a new backend slots in
without touching them.
"""

from __future__ import annotations

import abc
import time
from typing import Any, Sequence

import torch

from ..planner import CopyPlan

__all__ = ["Buffer", "SymmetricHeap", "Event", "CopyEngine", "Composite", "Backend", "Timer", "HostTimer",
           "JobTiming"]


class Event(abc.ABC):
    """A completion signal recorded by a backend."""

    @abc.abstractmethod
    def wait(self, *, stream: Any = None) -> None:
        """Make ``stream`` wait for this event (non-blocking for the host on GPU backends; on
        ``sim``, where the host is the only stream, ``stream`` is accepted and ignored and the host
        waits)."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Block the calling host thread until the event completed; re-raise a copy failure."""

    @property
    @abc.abstractmethod
    def is_done(self) -> bool:
        """True once the event completed (never blocks)."""


class Buffer(abc.ABC):
    """A region of this rank's memory."""

    nbytes: int

    @abc.abstractmethod
    def tensor(self, offset: int = 0, nbytes: int | None = None) -> torch.Tensor:
        """Zero-copy ``uint8`` view ``[nbytes]`` of bytes ``[offset, offset + nbytes)``."""

    def private_tensor(self, offset: int = 0, nbytes: int | None = None) -> torch.Tensor:
        """A view for readers that must not change the buffer: copy-on-write where the backend can
        (``sim``: a write stays in the view), else the plain :meth:`tensor` (read-only by contract)."""
        return self.tensor(offset, nbytes)

    @abc.abstractmethod
    def close(self) -> None:
        """Release the buffer (idempotent). The memory is freed, or unmapped, once no tensor view
        references it any more: a view kept past ``close()`` stays valid (no crash), its bytes stale."""


class SymmetricHeap(abc.ABC):
    """One equally sized buffer per rank; peers read each other's through the copy engine."""

    nbytes: int
    local: Buffer

    @abc.abstractmethod
    def close(self) -> None:
        """Collective: free this rank's part once no peer reads it any more. Idempotent."""

    def abort(self) -> None:
        """Release this rank's part now, without any collective step (an exception unwinds on this
        rank only). Peers that still read it must not crash: backends keep the memory alive for
        them (shared files, imported handles) or leak it until the process exits. Idempotent."""
        self.close()


class Composite(abc.ABC):
    """One virtual range made of pieces of several buffers (no bytes are copied)."""

    @abc.abstractmethod
    def tensor(self) -> torch.Tensor:
        """``uint8`` view of the whole range."""

    @abc.abstractmethod
    def close(self) -> None:
        """Unmap the range."""


class Timer(abc.ABC):
    """Time points for telemetry: :meth:`mark` never blocks, :meth:`seconds` reads a point back later.

    A point is opaque (a float on the host, a timing event on a GPU); every point of one backend
    resolves to seconds on this host's ``time.perf_counter`` clock (``CLOCK_MONOTONIC`` on Linux:
    one clock for every process of a host, so the ranks of a host line up).
    """

    @abc.abstractmethod
    def mark(self, *, stream: Any = None) -> Any:
        """A point that passes when the work enqueued so far on ``stream`` (None: the current
        stream; the host on backends without streams) completed. Never blocks the host."""

    @abc.abstractmethod
    def seconds(self, point: Any) -> float:
        """The time ``point`` passed, in host ``perf_counter`` seconds. Blocks until it passed."""

    def elapsed(self, a: Any, b: Any) -> float:
        """Seconds from point ``a`` to point ``b`` (blocks until both passed); as precise as the
        clock allows, also far from where it was anchored."""
        return self.seconds(b) - self.seconds(a)

    def is_done(self, point: Any) -> bool:
        """True once ``point`` passed (never blocks)."""
        return True

    def free(self, point: Any) -> None:
        """Give the resources of a point that was read back (or is no longer wanted) back."""


class HostTimer(Timer):
    """The timer of host-synchronous backends (``sim``): a point is ``time.perf_counter()`` now."""

    def mark(self, *, stream: Any = None) -> float:
        """Now (``stream`` is accepted and ignored: host work before this call has finished)."""
        return time.perf_counter()

    def seconds(self, point: float) -> float:
        return float(point)


class JobTiming:
    """When the copies of one job ran, as a timed copy engine reports it (``submit(..., timing=t)``).

    The engine fills it before the job's done event completes; read it only after that event.
    Points are those of the backend's :class:`Timer`; an engine that records its own points on its
    streams uses :attr:`timer` (the caller's clock). Where a window has several starts or ends (a
    job or a source spread over several copy streams), the point is a tuple of points: the
    earliest start and the latest end count.

    Attributes
    ----------
    timer : Timer or None
        The clock whose points the engine records (given by the caller).
    start, end : point, tuple of points, or None
        The job's copies could begin (its ``after`` events passed) / every copy finished.
    sources : dict
        ``{src_rank: (start, end, busy_s, lane)}``: copies from ``src_rank`` ran between points
        ``start`` (before the first) and ``end`` (after the last); ``busy_s`` (float or None) is
        how long they were actually copying when the engine knows it (``sim``: the sum of their
        durations), else None (the window is the copy time); ``lane`` the copy stream (thread)
        they ran on (None: several). Sources sharing a lane have overlapping windows.
    """

    __slots__ = ("timer", "start", "end", "sources")

    def __init__(self, timer: Timer | None = None):
        self.timer = timer
        self.start = self.end = None
        self.sources: dict[int, tuple[Any, Any, float | None, int | None]] = {}

    def add(self, src_rank: int, start: Any, end: Any, busy_s: float | None = None, lane: int | None = None) -> None:
        """Record that the copies from ``src_rank`` ran between points ``start`` and ``end``."""
        self.sources[int(src_rank)] = (start, end, busy_s, lane)


class CopyEngine(abc.ABC):
    """Runs copy plans from a symmetric heap into local buffers, off the compute path.

    ``collective`` is True for engines whose ``close`` every rank must call (GPU ``sync`` engines).
    ``timed`` is True for engines whose ``submit`` takes ``timing=`` (a :class:`JobTiming` it fills
    with points of the backend's :meth:`Backend.timer`); callers pass it only then."""

    collective: bool = False
    timed: bool = False

    @abc.abstractmethod
    def submit(self, plan: CopyPlan, *, src_base: int, dst: Buffer, dst_base: int,
               after: Sequence[Event] = ()) -> Event:
        """Enqueue ``plan``; return at once with the event of its completion.

        Copy ``i`` reads ``plan.nbytes[i]`` bytes at ``src_base + plan.src_offset[i]`` of rank
        ``plan.src_rank[i]``'s heap and writes them at ``dst_base + plan.dst_offset[i]`` of ``dst``.
        No copy starts before every event of ``after`` completed. Copies run in plan order on each
        copy stream; GPU engines may spread a plan over several copy streams (``streams=``), and
        the returned event joins them. Engines with ``timed = True`` also take ``timing=`` (a
        :class:`JobTiming`, or None): when given, they record into it when the copies ran, at a
        cost of a few time points per job and source, and without changing the copies' order.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Wait for submitted work, then release the engine's resources. Idempotent."""

    def abort(self) -> None:
        """Release the engine without any collective step and without waiting for peers (work
        already running may finish). Idempotent. Engines with a local ``close`` just close."""
        self.close()


class Backend(abc.ABC):
    """A heap backend bound to one rank of a group.

    Attributes
    ----------
    name : str
        ``"sim"``, ``"cuda_ipc"`` or ``"nvshmem"``.
    device : torch.device
        Where heap tensors live.
    alloc_alignment : int
        Offsets the store gives to heap and slot entries are multiples of this.
    map_granularity : int or None
        When not None, :meth:`compose` can join pieces whose offsets and sizes are multiples of it.
    private_composites : bool
        True when composites map heap pages copy-on-write (``sim``): the prefetcher then builds
        fresh views for every handle, so that a write through one stays in it.
    """

    name: str
    device: torch.device
    alloc_alignment: int = 256
    map_granularity: int | None = None
    private_composites: bool = False

    @abc.abstractmethod
    def alloc_symmetric(self, nbytes: int, boundaries: Sequence[int] = ()) -> SymmetricHeap:
        """Collective: allocate ``nbytes`` on every rank and exchange what peers need to read it.

        ``boundaries`` are offsets where :meth:`compose` pieces may start or end; backends whose
        composites can only map whole physical allocations cut the memory there (they may differ
        between ranks; the layout of offsets stays symmetric)."""

    @abc.abstractmethod
    def alloc_buffer(self, nbytes: int, boundaries: Sequence[int] = ()) -> Buffer:
        """Allocate a local buffer (a prefetch slot); ``boundaries`` as in :meth:`alloc_symmetric`."""

    @abc.abstractmethod
    def copy_engine(self, heap: SymmetricHeap, **options: Any) -> CopyEngine:
        """A copy engine that reads from ``heap`` on any rank.

        ``options`` are engine settings that a backend may support (GPU backends: ``streams``,
        ``api``, ...); an unknown or unsupported one raises ``InvalidArgumentError`` naming it.
        """

    @abc.abstractmethod
    def record_event(self, *, stream: Any = None) -> Event:
        """An event that completes when the work enqueued so far on ``stream`` did (keyword-only;
        accepted and ignored on backends without streams, ``sim``)."""

    def capture_id(self, *, stream: Any = None) -> int | None:
        """The id of the CUDA graph capture ``stream`` is part of, or None when it is not capturing
        (always None on backends without streams)."""
        return None

    def timer(self) -> Timer | None:
        """The clock of this backend's telemetry (:class:`Timer`), or None when it has none."""
        return None

    def compose(self, pieces: Sequence[tuple[Buffer, int, int]]) -> Composite:
        """Join ``(buffer, offset, nbytes)`` pieces into one virtual range, zero copy. Offsets and
        sizes are multiples of ``map_granularity`` and lie on the buffers' ``boundaries``."""
        raise NotImplementedError(f"backend {self.name!r} cannot compose views")

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Block until every copy and kernel this rank issued has finished."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the backend (collective where the backend's library requires it)."""

    def abort(self) -> None:
        """Release this rank's part of the backend without any collective step (an exception unwinds
        on this rank only; :meth:`dwdp_comm.group.Group.abort`). Backends whose ``close`` is local
        just close. Idempotent."""
        self.close()
