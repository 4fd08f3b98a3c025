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

from collections import deque
from typing import Any, Iterable

import numpy as np
import torch

import logging

from .errors import ClosedError, DwdpError, GraphCaptureError, SlotStillHeldError, bad_arg, bad_type
from .group import describe
from .planner import PlanCache, make_plan, policies
from .store import WeightStore

log = logging.getLogger("dwdp_comm")

__all__ = ["Prefetcher", "PrefetchHandle"]


class _Slot:
    def __init__(self, index: int, buffer):
        self.index = index
        self.buffer = buffer
        self.queue: deque[PrefetchHandle] = deque()  # front = the handle whose data is (being) in the slot
        self.fence: list = []  # events the next writer waits for: last copy done, last release
        self.views: dict[tuple[int, str], tuple[torch.Tensor, list]] = {}
        self.composites: list = []


class PrefetchHandle:
    """One prefetch of one layer into one slot. Made by :meth:`Prefetcher.prefetch`.

    Attributes
    ----------
    layer : int
    slot : int
        Index of the ring slot it occupies.
    """

    def __init__(self, pf: "Prefetcher", layer: int, slot: _Slot, fetched: tuple[int, ...], after: list,
                 capture: int | None = None):
        self._pf, self.layer, self._slot, self.slot = pf, layer, slot, slot.index
        self._fetched = fetched
        self._after = after
        self._capture = capture
        self._ready = None  # completion event, set when the copy job is submitted
        self._release_event = None
        self._waited = False
        self._released = False
        self._complete = False  # fetches every remote expert (set by Prefetcher.prefetch)
        self._slot_free = False  # nothing to copy and no view reads the slot (set by Prefetcher.prefetch)

    # ---- state ---------------------------------------------------------------------------------
    @property
    def is_submitted(self) -> bool:
        """True once its copies were handed to the copy engine (False while the slot is held)."""
        return self._ready is not None

    @property
    def is_done(self) -> bool:
        """True once every copy of this prefetch completed. Never blocks. Refused (GraphCaptureError)
        for a captured handle, whose copies run only when the graph replays."""
        if self._capture is not None:
            raise GraphCaptureError(f"is_done of the prefetch of layer {self.layer}: it was recorded in a CUDA "
                                    "graph capture and runs only when the graph replays")
        return self._ready is not None and self._ready.is_done

    @property
    def capture(self) -> int | None:
        """The id of the CUDA graph capture this prefetch was recorded in (None: eager)."""
        return self._capture

    @property
    def released(self) -> bool:
        """True after :meth:`release`."""
        return self._released

    @property
    def present_experts(self) -> tuple[int, ...]:
        """Global experts whose weights this handle holds: the local ones and the fetched ones."""
        lay = self._pf.store.layout
        return tuple(sorted(set(lay.local_experts) | set(self._fetched)))

    def is_present(self, expert: int) -> bool:
        """True when ``expert``'s weights are local or were fetched by this handle."""
        lay = self._pf.store.layout
        return lay.is_local(expert) or expert in self._fetched_set

    @property
    def _fetched_set(self) -> frozenset:
        s = getattr(self, "_fs", None)
        if s is None:
            s = self._fs = frozenset(self._fetched)
        return s

    # ---- synchronisation -----------------------------------------------------------------------
    def wait(self, *, stream: Any = None) -> None:
        """Make ``stream`` wait until the prefetched bytes are in the slot.

        On GPU backends the stream waits (the host does not block); on ``sim`` the host blocks
        until the copy thread finished this prefetch. Call it before :meth:`weights`.

        Parameters
        ----------
        stream : optional
            The consumer stream (a ``torch.cuda.Stream``, a CuPy stream or a raw handle; None:
            the current stream). Must be None on ``sim``.

        Raises
        ------
        SlotStillHeldError
            The slot's previous handle (named in the message) was not released, so this prefetch
            has not started and never would.
        DwdpError
            The copy engine failed (the cause is chained), or the handle was released.
        GraphCaptureError
            ``stream`` is capturing a CUDA graph and this prefetch was not issued inside that
            capture (its copies would not be in the graph), or this prefetch was recorded in a
            capture and ``stream`` is not part of it.
        """
        self._check_usable("wait")
        self._check_same_capture(stream, "wait")
        if self._ready is None:
            holder = self._slot.queue[0]
            raise SlotStillHeldError(
                f"prefetch of layer {self.layer} cannot start: slot {self.slot} is still held by the handle of "
                f"layer {holder.layer}; release() that handle first (or use a larger depth)")
        self._ready.wait(stream=stream)
        self._waited = True

    def synchronize(self) -> None:
        """Block the host until the copies completed (for tests and benchmarks).

        Unlike :meth:`wait` it does not make :meth:`weights` readable; it raises
        :class:`~dwdp_comm.errors.SlotStillHeldError` as :meth:`wait` does.
        """
        self._check_usable("synchronize")
        if self._capture is not None:
            raise GraphCaptureError(f"synchronize() of the prefetch of layer {self.layer}: it was recorded in a CUDA "
                                    "graph capture; synchronize the stream the graph replays on instead")
        if self._ready is None:
            self.wait()  # raises SlotStillHeldError
        self._ready.synchronize()

    def release(self, *, stream: Any = None) -> None:
        """Declare the slot free once the work enqueued so far on ``stream`` completes.

        Call it after the kernels that read :meth:`weights` were enqueued on ``stream``. The next
        prefetch into this slot is submitted now and its copies wait for that point. Never blocks
        the host. The weights tensors must not be read after it.

        Parameters
        ----------
        stream : optional
            The stream whose enqueued work read the weights (None: the current stream). Must be
            None on ``sim``, where the host is the only stream and the release is immediate.

        Raises
        ------
        DwdpError
            The handle was already released.
        ClosedError
            The prefetcher was closed.
        GraphCaptureError
            ``stream`` is capturing a CUDA graph and this prefetch was issued outside it.

        Notes
        -----
        A captured handle released outside its capture (a capture that raised half-way) records
        nothing: the slot's next eager prefetch is ordered after the current stream instead.
        """
        self._pf._check_open()
        if self._released:
            raise DwdpError(f"handle of layer {self.layer} released twice")
        cap = self._pf.capture_id(stream=stream)
        if cap is not None and cap != self._capture:
            raise GraphCaptureError(
                f"release() of the prefetch of layer {self.layer} inside a CUDA graph capture, but it was "
                f"{'issued outside any capture' if self._capture is None else 'recorded in another capture'}; "
                "release it outside (DwdpPipeline.prepare_capture() releases a pipeline's handles before capturing)")
        if self._slot_free or (self._capture is not None and cap is None):
            self._release_event = None  # nothing read the slot / abandoned capture: nothing to order after
        else:
            self._release_event = self._pf._backend.record_event(stream=stream)
        self._released = True
        self._pf._pump(self._slot)

    # ---- data ----------------------------------------------------------------------------------
    def weights(self, name: str, experts: Iterable[int] | None = None) -> torch.Tensor:
        """``[num_experts, *expert_shape]`` tensor of ``name`` in global expert order, zero copy.

        Parameters
        ----------
        name : str
            A name registered for this layer.
        experts : iterable of int, optional
            The experts the caller will read. Default: all of them. Each must be present
            (local or fetched); asking for an absent one is an error. Rows of absent experts
            hold unspecified bytes.

        Returns
        -------
        torch.Tensor
            On the group's device, dtype as registered. Read-only by contract (see the module
            docstring). Its bytes are meaningful until :meth:`release`; the memory stays valid
            while the tensor is referenced (reading it later never crashes, even past ``close()``).

        Raises
        ------
        InvalidArgumentError
            ``name`` is not registered for this layer, or an asked-for expert is absent
            (the handle was made with ``experts=`` that left it out).
        DwdpError
            Called before :meth:`wait` or after :meth:`release`.
        """
        self._check_readable()
        self._check_present(experts)
        return self._pf._view(self._slot, self.layer, name)[0]

    def weight_segments(self, name: str) -> list[tuple[int, torch.Tensor]]:
        """The same weights as contiguous per-owner pieces: ``[(first_expert, tensor), ...]``.

        The pieces cover experts ``0 .. num_experts-1`` in order; each is ``[count, *expert_shape]``
        of the registered dtype on the group's device (local shard and slot pieces, zero copy).
        This is the split-weight form a grouped GEMM can consume without a merged tensor. Needs
        :meth:`wait` first and every expert present; valid until :meth:`release`. In composite mode
        the pieces are slices of the composite view (read-only by contract, as :meth:`weights`).
        """
        self._check_readable()
        self._check_present(None)
        return list(self._pf._view(self._slot, self.layer, name)[1])

    # ---- helpers -------------------------------------------------------------------------------
    def _check_same_capture(self, stream: Any, what: str) -> None:
        cap = self._pf.capture_id(stream=stream)
        if cap == self._capture:
            return
        if self._capture is None:
            raise GraphCaptureError(
                f"{what}() inside a CUDA graph capture on the prefetch of layer {self.layer}, which was issued "
                "before the capture: its copies are not in the graph, so a replay would read whatever the slot "
                "holds. Issue the prefetch inside the capture (DwdpPipeline.begin() does, after prepare_capture())")
        if cap is None:
            raise GraphCaptureError(
                f"{what}() outside a CUDA graph capture on the prefetch of layer {self.layer}, which was recorded "
                "in a capture: its copies run only when the graph replays; wait on it inside the capture")
        raise GraphCaptureError(f"{what}() on the prefetch of layer {self.layer} inside CUDA graph capture {cap}, "
                                f"but it was recorded in capture {self._capture}")

    def _check_usable(self, what: str) -> None:
        self._pf._check_open()
        if self._released:
            raise DwdpError(f"{what}() on the handle of layer {self.layer} after release()")

    def _check_readable(self) -> None:
        self._check_usable("weights")
        if not self._waited:
            raise DwdpError(f"weights() of layer {self.layer} before wait(): call handle.wait(stream=...) first")

    def _check_present(self, experts: Iterable[int] | None) -> None:
        if experts is None and self._complete:
            return  # every remote expert fetched (the default): nothing can be absent
        lay = self._pf.store.layout
        if experts is None:
            absent = [e for e in lay.remote_experts if e not in self._fetched_set]
        else:
            wanted = _expert_list(experts, lay.num_experts)
            absent = sorted({e for e in wanted if not lay.is_local(e) and e not in self._fetched_set})
        if absent:
            shown = absent[:16] + (["..."] if len(absent) > 16 else [])
            raise bad_arg("experts", f"absent experts {shown}" if experts is not None else "all experts (default)",
                          "experts this handle fetched",
                          f"layer {self.layer} was prefetched with experts=...; pass experts= with the ones you read")

    def __enter__(self) -> "PrefetchHandle":
        return self

    def __exit__(self, *exc) -> None:
        if not self._released and not self._pf.closed:
            self.release()

    def __repr__(self) -> str:
        state = ("released" if self._released else "captured" if self._capture is not None else
                 "done" if self.is_done else "in flight" if self.is_submitted else "waiting for its slot")
        return f"PrefetchHandle(layer={self.layer}, slot={self.slot}, {state})"


class _NoCopies:
    """The ready event of a slot-free handle: nothing was copied, so nothing to wait for."""

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


def _expert_list(experts: Any, num_experts: int) -> list[int]:
    if isinstance(experts, (torch.Tensor, np.ndarray)):
        if experts.ndim != 1 or experts.dtype in (torch.bool, np.bool_) or \
                (isinstance(experts, torch.Tensor) and experts.is_floating_point()) or \
                (isinstance(experts, np.ndarray) and experts.dtype.kind not in "iu"):
            raise bad_arg("experts", f"a {experts.ndim}-D array of {experts.dtype}", "a 1-D array of ints")
        experts = experts.tolist()
    try:
        items = list(experts)
    except TypeError:
        raise bad_type("experts", experts, "an iterable of ints") from None
    out = []
    for e in items:
        if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 0 <= e < num_experts:
            raise bad_arg("experts", e, f"ints in [0, {num_experts})")
        out.append(int(e))
    return out


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
        ``overlap_hint``. ``sim``: ``corrupt_copy`` (fault injection) only.

    Notes
    -----
    Local (not collective), except on ``nvshmem`` across nodes, where slots are symmetric memory
    and construction is collective. ``prefetch`` never blocks the host.

    Under CUDA graph capture (detected per call from the stream), see the module docstring and
    :meth:`prepare_capture`; ``nbytes_prefetched`` and the plan cache count a captured prefetch
    once, at capture (not per replay).
    """

    def __init__(self, store: WeightStore, depth: int = 2, schedule: str = "round_robin",
                 chunk_nbytes: int = 8 << 20, engine_options: dict | None = None):
        if not isinstance(store, WeightStore):
            raise bad_type("store", store, "a dwdp_comm.WeightStore")
        store.check_committed()
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)):
            raise bad_type("depth", depth, "an int")
        if depth < 1:
            raise bad_arg("depth", depth, "an int >= 1")
        if schedule not in policies():
            raise bad_arg("schedule", schedule, f"one of {policies()}")
        if isinstance(chunk_nbytes, bool) or not isinstance(chunk_nbytes, (int, np.integer)):
            raise bad_type("chunk_nbytes", chunk_nbytes, "an int")
        if chunk_nbytes <= 0:
            raise bad_arg("chunk_nbytes", chunk_nbytes, "an int > 0 (bytes per chunk)")
        self.store, self.depth, self.schedule, self.chunk_nbytes = store, int(depth), schedule, int(chunk_nbytes)
        self._backend = store.group.impl
        self._fresh_views = bool(getattr(self._backend, "private_composites", False))
        self._plans = PlanCache()
        self._remote = tuple(store.layout.remote_experts)
        self._slot_free: dict[int, bool] = {}  # layer -> every view lies in this rank's heap (nothing to copy)
        self._count = 0
        self.nbytes_prefetched = 0
        self._closed = False
        self._engine, self._slots = None, []
        err, cause = None, None
        try:
            self._engine = self._backend.copy_engine(store.heap, **(engine_options or {}))  # agreed inside if collective
            cuts = store.slot_boundaries()
            for i in range(self.depth):
                self._slots.append(_Slot(i, self._backend.alloc_buffer(store.slot_nbytes, cuts)))
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

    def _free(self, collective: bool) -> None:
        """Release the engine (collectively or not) and the slots of a prefetcher being given up."""
        self._closed = True
        try:
            if self._engine is not None:
                self._engine.close() if collective else self._engine.abort()
        except Exception as exc:
            log.warning("dwdp_comm: releasing the copy engine failed: %r", exc)
        for slot in self._slots:
            self._drop_views(slot)
            slot.queue.clear()
            slot.buffer.close()

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
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.depth:
            raise bad_arg("index", index, f"a slot index in [0, {self.depth})")
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
            fetched = tuple(sorted({e for e in _expert_list(experts, lay.num_experts) if not lay.is_local(e)}))
        cap = self.capture_id(stream=stream)
        slot = self._slots[self._count % self.depth]
        if cap is not None:
            self._check_capturable(slot, int(layer), cap)
        slot_free = self._is_slot_free(int(layer))
        after = [self._backend.record_event(stream=stream)] if (stream is not None or cap is not None) and \
            not slot_free else []
        self._count += 1
        handle = PrefetchHandle(self, int(layer), slot, fetched, after, cap)
        handle._complete, handle._slot_free = fetched == self._remote, slot_free
        slot.queue.append(handle)
        self._pump(slot)
        return handle

    def _is_slot_free(self, layer: int) -> bool:
        """True when every name of ``layer`` is viewed from this rank's heap alone (all its experts
        local, composite mode: a group of one): its prefetches copy nothing and never read a slot."""
        free = self._slot_free.get(layer)
        if free is None:
            free = self._slot_free[layer] = all(p.source == "heap" for n in self.store.names(layer)
                                                for p in self.store.slot_view(layer, n).pieces)
        return free

    def capture_id(self, *, stream: Any = None) -> int | None:
        """The id of the CUDA graph capture ``stream`` (None: the current stream) is part of, or
        None (always None on ``sim``). Never blocks."""
        return self._backend.capture_id(stream=stream)

    def _check_capturable(self, slot: _Slot, layer: int, cap: int) -> None:
        refusal = getattr(self._engine, "capture_refusal", None)
        problem = refusal() if refusal is not None else f"the {self._backend.name} copy engine cannot capture"
        if problem is not None:
            raise GraphCaptureError(f"prefetch({layer}) under CUDA graph capture: {problem}")
        foreign = [h for h in slot.queue if h._capture != cap]
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
            live = [h for h in slot.queue if not h._released]
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
                    self._view(slot, layer, name)

    def _pump(self, slot: _Slot) -> None:
        """Drop released handles from the slot's front; submit the new front if it is waiting."""
        while slot.queue and slot.queue[0]._released:
            h = slot.queue.popleft()
            if h._ready is not None and not h._slot_free:  # a slot-free handle neither wrote nor read it
                slot.fence = [ev for ev in (h._ready, h._release_event) if ev is not None]
            # A handle released before it was submitted is cancelled: it never writes.
        if slot.queue and slot.queue[0]._ready is None:
            h = slot.queue[0]
            if h._slot_free:  # no copy job, nothing to wait for; the slot's fence stays as it was
                if self._fresh_views:
                    self._drop_views(slot)
                h._ready = _NO_COPIES
                return
            fence = slot.fence
            if h._capture is None and any(_capture_of(ev) is not None for ev in fence):
                # The slot was last used by a captured graph: its events order nothing outside it. Replays
                # are stream-ordered work, so order this eager copy after the current stream instead.
                fence = [ev for ev in fence if _capture_of(ev) is None] + [self._backend.record_event()]
            elif h._capture is not None:
                # Events of earlier captures: those graphs' replays are ordered by their stream.
                fence = [ev for ev in fence if _capture_of(ev) == h._capture]
            key = (self.store.layer_signature(h.layer), h._fetched, self.schedule, self.chunk_nbytes)
            plan = self._plans.get(key, lambda: make_plan(
                self.store.copy_ranges(h.layer, h._fetched), rank=self.store.layout.rank,
                group_size=self.store.layout.group_size, policy=self.schedule, chunk_nbytes=self.chunk_nbytes))
            if self._fresh_views:
                self._drop_views(slot)  # copy-on-write views: the previous handle's writes stay in its views
            extra = {"capture": h._capture} if h._capture is not None else {}
            h._ready = self._engine.submit(plan, src_base=self.store.layer_base(h.layer), dst=slot.buffer,
                                           dst_base=0, after=fence + h._after, **extra)
            self.nbytes_prefetched += plan.total_nbytes

    def _view(self, slot: _Slot, layer: int, name: str) -> tuple[torch.Tensor, list]:
        """(full tensor, segments) of ``name`` in ``slot`` for ``layer``; built once, then cached."""
        key = (layer, name)
        hit = slot.views.get(key)
        if hit is not None:
            return hit
        view = self.store.slot_view(layer, name)  # the store owns placement: it says which pieces
        if view.mode == "gather":
            (piece,) = view.pieces
            full = view.typed(slot.buffer.tensor(piece.offset, piece.nbytes))
            segments = [(0, full)]
        else:
            buffers = {"slot": slot.buffer, "heap": self.store.heap.local}
            comp = self._backend.compose([(buffers[p.source], p.offset, p.nbytes) for p in view.pieces])
            slot.composites.append(comp)
            full = view.typed(comp.tensor())
            # Slices of the composite: the local piece is never the heap tensor itself.
            segments = [(p.first, full[p.first:p.first + p.count]) for p in view.pieces]
        slot.views[key] = (full, segments)
        return full, segments

    @staticmethod
    def _drop_views(slot: _Slot) -> None:
        for comp in slot.composites:
            comp.close()  # unmapped when the views handed out so far go
        slot.composites.clear()
        slot.views.clear()

    def synchronize(self) -> None:
        """Block the host until every submitted eager copy of this prefetcher completed. Local.
        Copies recorded in a CUDA graph capture run at replay: synchronize the replay's stream."""
        self._check_open()
        self._wait_all()

    def _wait_all(self) -> None:
        """Wait for every eager event (captured ones complete only with their graph's replays)."""
        for slot in self._slots:
            for h in slot.queue:
                if h._ready is not None and h._capture is None:
                    h._ready.synchronize()
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
            self._drop_views(slot)
            slot.queue.clear()
            slot.buffer.close()
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
