"""Prefetcher: a ring of ``depth`` slots that the copy engine fills with the next layers' experts.

How one prefetch flows::

    prefetch(l) ──> handle queued on slot i = n % depth
                     │  the slot's previous handle released? ──no──> deferred (host keeps it queued;
                     │                                              nothing blocks)
                     ▼ yes                                           │ previous handle's release()
    plan = PlanCache[(layer shape, experts)]  <──────────────────────┘
    copy engine: wait(previous copy done, previous release, caller's stream) ─> chunk copies ─> ready
    handle.wait(stream=s)    consumer stream waits on `ready` (the host, on sim)
    handle.weights(name)     [num_experts, ...] view: local experts + slot pages
    handle.release(stream=s) records the consume event the next copy into the slot waits on

A slot is never overwritten before the handle that owns it was released: the next handle for the
slot is not even submitted until then. Waiting on such a deferred handle raises
:class:`~dwdp_comm.errors.SlotStillHeldError` instead of deadlocking.

Prefetched views are read-only by contract. On ``sim`` a write never reaches the heap: composite
views map the heap pages copy-on-write and are rebuilt for every handle, so a write stays in that
handle's view and is gone at the next prefetch into the slot. On GPU backends a composite view's
local rows are the heap pages that peers read: writing them would change the expert for every rank.

CUDA graphs: a prefetch issued while its stream is capturing (``stream``, or the current torch
stream) is recorded into that capture: the copy streams fork from the capturing stream, the copies
become memcpy nodes, ``wait`` and ``release`` record the joins. Each such handle belongs to its
capture: waiting on it outside, or waiting inside a capture on a handle issued outside, raises
:class:`~dwdp_comm.errors.GraphCaptureError`. :meth:`Prefetcher.prepare_capture` (host-blocking)
makes the prefetcher ready for a capture; what a replay assumes is in ``docs/design.md``
("CUDA graphs").
"""

from __future__ import annotations

from typing import Any, Iterable

import logging

from .errors import ClosedError, DwdpError, GraphCaptureError, bad_arg, bad_type
from .checks import check_int
from .comm import describe
from .planner import PlanCache, make_plan, policies
from .prefetch_handle import PrefetchHandle, PrefetchHooks, PrefetchJob, Slot, expert_list
from .store import WeightStore
from .telemetry import PrefetchRecorder, Telemetry, empty_telemetry, recording

log = logging.getLogger("dwdp_comm")

__all__ = ["Prefetcher", "PrefetchHandle"]  # PrefetchHandle lives in prefetch_handle.py


class _NoCopies:
    """The ready event of a slot-free job: nothing was copied, so nothing to wait for."""

    capture = None
    is_done = True

    def wait(self, *, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass


_NO_COPIES = _NoCopies()


def _capture_of(event: Any) -> int | None:
    """The capture an event was recorded in (backends without graphs have no such attribute)."""
    return getattr(event, "capture", None)


class Prefetcher:
    """Prefetches layers' remote experts into a ring of ``depth`` slots with the copy engine.

    Parameters
    ----------
    store : WeightStore
        A committed store.
    depth : int
        Number of slots (>= 1). With depth 2, layer l+1 is fetched while layer l computes.
    schedule : str
        Copy-plan policy (see :mod:`dwdp_comm.planner`): ``"round_robin"``, ``"rotated"``, ``"naive"``.
    chunk_nbytes : int
        Chunk size of the plan (> 0).
    engine_options : dict, optional
        Settings for the backend's copy engine. GPU backends: ``streams`` (copy streams, >= 1),
        ``api`` (``"memcpy"`` or ``"batch"``: one ``cudaMemcpyBatchAsync`` per job and stream),
        ``distribute`` (``"source"`` or ``"slot"``: how copies are spread over the streams),
        ``overlap_hint``. ``sim``: ``corrupt_copy`` (fault injection) and ``source_bandwidth``
        (slow peers, for tests).
    telemetry : bool
        Record telemetry from the start (:meth:`enable_telemetry`; default off).

    Notes
    -----
    Local (not collective), except on ``nvshmem`` across nodes, where slots are symmetric memory
    and construction is collective. ``prefetch`` never blocks the host.

    Under CUDA graph capture (detected per call from the stream), see the module docstring and
    :meth:`prepare_capture`; ``nbytes_prefetched`` and the plan cache count a captured prefetch
    once, at capture (not per replay).
    """

    def __init__(self, store: WeightStore, depth: int = 2, schedule: str = "round_robin",
                 chunk_nbytes: int = 8 << 20, engine_options: dict | None = None, telemetry: bool = False):
        if not isinstance(store, WeightStore):
            raise bad_type("store", store, "a dwdp_comm.WeightStore")
        store.check_committed()
        depth = check_int("depth", depth, low=1)
        if schedule not in policies():
            raise bad_arg("schedule", schedule, f"one of {policies()}")
        chunk_nbytes = check_int("chunk_nbytes", chunk_nbytes, low=1, expected="an int > 0 (bytes per chunk)")
        self.store, self.depth, self.schedule, self.chunk_nbytes = store, int(depth), schedule, int(chunk_nbytes)
        self._backend = store.group.impl
        self._fresh_views = bool(getattr(self._backend, "private_composites", False))
        self._plans = PlanCache()
        self._remote = tuple(store.layout.remote_experts)
        self._slot_free: dict[int, bool] = {}  # layer -> every view lies in this rank's heap (nothing to copy)
        self._count = 0
        self.nbytes_prefetched = 0
        self._closed = False
        self._tel: PrefetchRecorder | None = None
        self._tel_on = False
        self._engine, self._slots = None, []
        # What every handle calls back (prefetch_handle.PrefetchHooks): the only way in from a handle.
        self._hooks = PrefetchHooks(check_open=self._check_open, is_closed=lambda: self._closed,
                                    capture_id=lambda *, stream=None: self.capture_id(stream=stream),
                                    record_event=lambda *, stream=None: self._backend.record_event(stream=stream),
                                    released=self._pump)
        err, cause = None, None
        try:
            self._engine = self._backend.copy_engine(store.heap, **(engine_options or {}))  # agreed inside if collective
            cuts = store.slot_boundaries()
            for i in range(self.depth):
                self._slots.append(Slot(i, self._backend.alloc_buffer(store.slot_nbytes, cuts), store, self._backend))
        except Exception as exc:
            err, cause = describe(exc), exc
        if self._engine is not None and self._engine.collective:
            # Every rank holds a collective engine now: all keep it or all give it up together.
            try:
                store.group.comm.agree(err, "Prefetcher: creating the copy engine and the slots", cause=cause)
            except BaseException:
                self._free(collective=True)
                raise
        elif cause is not None:
            self._free(collective=False)
            raise cause
        store.attach(self)
        if telemetry:
            self.enable_telemetry()

    def _free(self, collective: bool) -> None:
        """Release the engine (collectively or not) and the slots of a prefetcher being given up."""
        self._closed = True
        try:
            if self._engine is not None:
                self._engine.close() if collective else self._engine.abort()
        except Exception as exc:
            log.warning("dwdp_comm: releasing the copy engine failed: %r", exc)
        for slot in self._slots:
            slot.free()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def plan_cache(self) -> PlanCache:
        """The cache of copy plans (``hits``, ``misses``)."""
        return self._plans

    @property
    def engine(self):
        """The backend's copy engine this prefetcher submits to (read it, e.g. ``engine.api`` or
        ``engine.captured_jobs`` on GPU backends; do not submit to it)."""
        return self._engine

    @property
    def engine_api(self) -> str | None:
        """The copy API the engine runs (``"batch"`` / ``"memcpy"`` on GPU backends; None where the
        engine has no such choice, as on ``sim``)."""
        return getattr(self._engine, "api", None)

    def slot_ptr(self, index: int) -> int:
        """Device address of byte 0 of prefetch slot ``index`` (``0 <= index < depth``), for raw
        copies and measurements at the very addresses the library uses. Local, non-blocking.

        Raises
        ------
        InvalidArgumentError
            ``index`` is not a slot index, or the backend's slots have no device address (``sim``).
        """
        self._check_open()
        index = check_int("index", index, low=0, high=self.depth - 1, expected=f"a slot index in [0, {self.depth})")
        buffer = self._slots[int(index)].buffer
        if not hasattr(buffer, "ptr"):
            raise bad_arg("index", index, f"a slot of a GPU backend (backend {self._backend.name!r} slots have no "
                          "device address)")
        return buffer.ptr

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot (the store's largest layer)."""
        return self.store.slot_nbytes

    def prefetch(self, layer: int, *, stream: Any = None, experts: Iterable[int] | None = None) -> PrefetchHandle:
        """Start fetching ``layer``'s remote experts into the next slot; return at once.

        Parameters
        ----------
        layer : int
            A committed layer.
        stream : optional
            If given, the copies start only after the work enqueued so far on this stream
            (GPU backends; must be None on ``sim``).
        experts : iterable of int, optional
            Global expert indices in ``[0, num_experts)`` to fetch (default: every remote one).
            Local experts are always present; remote experts left out are marked absent, and
            :meth:`PrefetchHandle.weights` refuses to serve them.

        Returns
        -------
        PrefetchHandle
            Owns slot ``n % depth`` (``n`` counts this prefetcher's calls). Its copies start once
            the slot's previous handle was released; until then it stays queued on the host.

        Raises
        ------
        InvalidArgumentError
            ``layer`` is not a committed layer, or an expert is outside ``[0, num_experts)``.
        ClosedError
            The prefetcher or its store was closed.
        GraphCaptureError
            ``stream`` (or the current stream) is capturing a CUDA graph and the prefetch cannot be
            recorded: the copy engine cannot capture (``sync`` time division, unmapped peers), or
            the slot still holds a prefetch from outside the capture (call :meth:`prepare_capture`
            before capturing). Nothing was queued.

        Notes
        -----
        Never blocks the host: the copy plan comes from :attr:`plan_cache` (built once per layer
        shape and expert set) and is handed to the backend's copy engine. Under capture the
        copies fork from the capturing stream at this call (``stream`` is then always a fork
        point) and are recorded as graph nodes.
        """
        self._check_open()
        self.store.names(layer)  # raises for an unregistered layer
        lay = self.store.layout
        if experts is None:
            fetched = self._remote
        else:
            fetched = tuple(sorted({e for e in expert_list(experts, lay.num_experts) if not lay.is_local(e)}))
        cap = self.capture_id(stream=stream)
        slot = self._slots[self._count % self.depth]
        if cap is not None:
            self._check_capturable(slot, int(layer), cap)
        # a recorded prefetch keeps its copy job (its telemetry times it), even when it copies nothing
        slot_free = not (self._tel_on and cap is None) and self._is_slot_free(int(layer))
        after = [self._backend.record_event(stream=stream)] if (stream is not None or cap is not None) and \
            not slot_free else []
        self._count += 1
        job = PrefetchJob(int(layer), fetched, after, cap)
        job.complete, job.slot_free = fetched == self._remote, slot_free
        if self._tel_on and cap is None:  # captured prefetches run at replay, without the host: not recorded
            job.recorder, job.record = self._tel, self._tel.open(self._count - 1, int(layer), slot.index)
        slot.queue.append(job)
        self._pump(slot)
        return PrefetchHandle(self._hooks, job, slot, lay)

    def _is_slot_free(self, layer: int) -> bool:
        """True when every name of ``layer`` is viewed from this rank's heap alone (all its experts
        local, composite mode: a group of one): its prefetches copy nothing and never read a slot."""
        free = self._slot_free.get(layer)
        if free is None:
            free = self._slot_free[layer] = all(p.source == "heap" for n in self.store.names(layer)
                                                for p in self.store.slot_view(layer, n).pieces)
        return free

    # ---- telemetry --------------------------------------------------------------------------------
    def enable_telemetry(self, *, max_records: int = 100_000) -> None:
        """Record telemetry of the next prefetches (:mod:`dwdp_comm.telemetry`). Local, non-blocking.

        Per prefetch: bytes per source rank, when the copy engine ran them (where it is timed), and
        time points on the consumer stream around :meth:`PrefetchHandle.wait` and at ``release``.
        Costs a few time points per prefetch (CUDA events on GPUs), none while disabled; at most
        ``max_records`` records are kept (the oldest dropped). Prefetches inside a CUDA graph
        capture are not recorded. Calling it again only updates ``max_records``.

        Raises
        ------
        DwdpError
            The backend has no clock for telemetry (``Backend.timer()`` is None).
        """
        self._check_open()
        if self.capture_id() is not None:
            raise GraphCaptureError("Prefetcher.enable_telemetry() may synchronize the device: call it outside the "
                                    "CUDA graph capture")
        if self._tel is None:
            timer = self._backend.timer()
            if timer is None:
                raise DwdpError(f"telemetry: the {self._backend.name} backend has no clock (Backend.timer() is None)")
            lay = self.store.layout
            self._tel = PrefetchRecorder(timer, lay.rank, lay.group_size, self._backend.name, max_records)
        else:
            self._tel.set_max_records(max_records)
        self._tel_on = True

    def disable_telemetry(self) -> None:
        """Stop recording new prefetches (those in flight finish their records; records are kept)."""
        self._tel_on = False

    @property
    def telemetry_enabled(self) -> bool:
        """True while new prefetches are recorded."""
        return self._tel_on

    def recording(self, **options: Any):
        """Context manager: telemetry on inside (``options`` as :meth:`enable_telemetry`), back off after."""
        return recording(self, **options)

    def telemetry(self, *, reset: bool = False) -> Telemetry:
        """The records of released prefetches so far (:class:`~dwdp_comm.telemetry.Telemetry`).

        Host-blocking: waits until the recorded copies and consumer work finished (on GPUs) to read
        their time points. Handles not yet released are reported by a later call. ``reset``
        forgets the records returned. Local; refused during a CUDA graph capture. Never enabled:
        a Telemetry with no records.
        """
        if self.capture_id() is not None:
            raise GraphCaptureError("Prefetcher.telemetry() blocks the host: call it outside the CUDA graph capture")
        lay = self.store.layout
        if self._tel is None:
            return empty_telemetry(lay.rank, lay.group_size, self._backend.name)
        return self._tel.telemetry(reset=reset)

    def capture_id(self, *, stream: Any = None) -> int | None:
        """The id of the CUDA graph capture ``stream`` (None: the current stream) is part of, or
        None (always None on ``sim``). Never blocks."""
        return self._backend.capture_id(stream=stream)

    def _check_capturable(self, slot: Slot, layer: int, cap: int) -> None:
        refusal = getattr(self._engine, "capture_refusal", None)
        problem = refusal() if refusal is not None else f"the {self._backend.name} copy engine cannot capture"
        if problem is not None:
            raise GraphCaptureError(f"prefetch({layer}) under CUDA graph capture: {problem}")
        foreign = [job for job in slot.queue if job.capture != cap]
        if foreign:
            raise GraphCaptureError(
                f"prefetch({layer}) under CUDA graph capture: slot {slot.index} is still held by the prefetch of layer "
                f"{foreign[0].layer}, issued outside this capture; release every handle and call "
                "Prefetcher.prepare_capture() (DwdpPipeline.prepare_capture()) before capturing")
        if not slot.queue and any(_capture_of(ev) is None for ev in slot.fence):
            raise GraphCaptureError(
                f"prefetch({layer}) under CUDA graph capture: slot {slot.index} was last written or read by eager work "
                "that the capture cannot wait for; call Prefetcher.prepare_capture() (host-blocking) before capturing")

    def prepare_capture(self, layers: Iterable[int] | None = None) -> None:
        """Make this prefetcher ready for a CUDA graph capture. Host-blocking, local.

        Waits for every eager copy and release so far (the slots' fences are then retired: a
        captured prefetch has nothing from outside its capture to wait for) and builds the
        weight views of ``layers`` (default: every committed layer) in every slot, so that the
        capture maps no memory. Call it after the eager forwards and before the capture, and
        again before replaying after eager forwards of this prefetcher.

        Raises
        ------
        DwdpError
            A handle is still held or queued (release it first), or this is called during a capture.
        """
        self._check_open()
        if self.capture_id() is not None:
            raise GraphCaptureError("Prefetcher.prepare_capture() blocks the host: call it before the capture")
        for slot in self._slots:
            live = [job for job in slot.queue if not job.released]
            if live:
                raise DwdpError(f"Prefetcher.prepare_capture(): slot {slot.index} is still held by the prefetch of "
                                f"layer {live[0].layer}; release every handle first")
        self._wait_all()
        for slot in self._slots:
            slot.fence = []  # eager ones completed; captured ones order nothing outside their graph
        if self._fresh_views:
            return  # sim builds views per handle (copy-on-write); nothing to map ahead
        layers = self.store.layers if layers is None else list(layers)
        for slot in self._slots:
            for layer in layers:
                for name in self.store.names(layer):
                    slot.view(layer, name)

    def _pump(self, slot: Slot) -> None:
        """Retire released jobs from the slot's front; submit the new front if it is waiting. Also
        :attr:`PrefetchHooks.released` of every handle: called when one is released."""
        slot.retire_released()
        job = slot.next_to_submit()
        if job is None:
            return
        if job.slot_free:  # no copy job, nothing to wait for; the slot's fence stays as it was
            if self._fresh_views:
                slot.drop_views()
            job.ready = _NO_COPIES
            return
        fence = slot.fence
        if job.capture is None and any(_capture_of(ev) is not None for ev in fence):
            # The slot was last used by a captured graph: its events order nothing outside it. Replays
            # are stream-ordered work, so order this eager copy after the current stream instead.
            fence = [ev for ev in fence if _capture_of(ev) is None] + [self._backend.record_event()]
        elif job.capture is not None:
            # Events of earlier captures: those graphs' replays are ordered by their stream.
            fence = [ev for ev in fence if _capture_of(ev) == job.capture]
        key = (self.store.layer_signature(job.layer), job.fetched, self.schedule, self.chunk_nbytes)
        plan = self._plans.get(key, lambda: make_plan(
            self.store.copy_ranges(job.layer, job.fetched), rank=self.store.layout.rank,
            group_size=self.store.layout.group_size, policy=self.schedule, chunk_nbytes=self.chunk_nbytes))
        if self._fresh_views:
            slot.drop_views()  # copy-on-write views: the previous handle's writes stay in its views
        extra = {"capture": job.capture} if job.capture is not None else {}
        if job.record is not None:
            timing = job.recorder.submitting(job.record, plan, getattr(self._engine, "timed", False))
            if timing is not None:
                extra["timing"] = timing
        job.ready = self._engine.submit(plan, src_base=self.store.layer_base(job.layer), dst=slot.buffer,
                                        dst_base=0, after=fence + job.after, **extra)
        if job.record is not None:
            job.recorder.submitted(job.record, job.ready)
        self.nbytes_prefetched += plan.total_nbytes

    def synchronize(self) -> None:
        """Block the host until every submitted eager copy of this prefetcher completed. Local.
        Copies recorded in a CUDA graph capture run at replay: synchronize the replay's stream."""
        self._check_open()
        self._wait_all()

    def _wait_all(self) -> None:
        """Wait for every eager event (captured ones complete only with their graph's replays)."""
        for slot in self._slots:
            for job in slot.queue:
                if job.ready is not None and job.capture is None:
                    job.ready.synchronize()
            for ev in slot.fence:
                if _capture_of(ev) is None:
                    ev.synchronize()

    def close(self) -> None:
        """Wait for copies in flight (blocks the host), then free the slots.

        Local, except with a copy engine whose ``close`` is collective (``sync="slot"`` or
        ``"source"``: every rank must call it). Handles become unusable; views already handed out
        stay readable (stale) while referenced. A second call does nothing, and so does closing the
        store first (it closes its prefetchers). The engine is closed first: closing waits for its
        copies and, for a ``sync`` engine whose ranks submitted different numbers of jobs, first
        releases the copy streams left waiting (and then raises
        :class:`~dwdp_comm.errors.CollectiveMismatchError`); waiting on the handles before that
        would block forever. The first error is raised after the slots were freed.

        A CUDA graph that captured prefetches of this prefetcher reads its slots and the peers'
        heaps at every replay: synchronize the replays and drop the graph before closing.
        """
        if self._closed:
            return
        self._closed = True
        errors = []
        for step in (self._engine.close, self._wait_all):
            try:
                step()
            except Exception as exc:  # free the slots anyway; report the first error
                errors.append(exc)
        for slot in self._slots:
            slot.free()
        if errors:
            raise errors[0]

    def abort(self) -> None:
        """Release the engine and the slots now, without any collective step and without waiting
        for peers (an exception unwinds on this rank only). Idempotent."""
        if not self._closed:
            self._free(collective=False)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("Prefetcher used after close()")
        if self.store.closed:
            raise ClosedError("Prefetcher used after its WeightStore was closed")

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()  # no collective engine step while an exception unwinds on this rank
        else:
            self.close()

    def __repr__(self) -> str:
        return (f"Prefetcher(depth={self.depth}, schedule={self.schedule!r}, chunk_nbytes={self.chunk_nbytes}, "
                f"slot_nbytes={self.store.slot_nbytes})")
