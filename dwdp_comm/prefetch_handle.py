"""One prefetch and the ring slot it occupies: :class:`PrefetchHandle`, and the library-internal
pieces that :class:`~dwdp_comm.prefetch.Prefetcher` shares with it.

The user holds a :class:`PrefetchHandle`; the prefetcher keeps the same prefetch's state as a
:class:`PrefetchJob` in its :class:`Slot`'s queue. The two sides meet only through names documented
here, none private:

- prefetcher -> handle: the :class:`PrefetchJob` fields (the prefetcher fills ``ready`` when it
  submits the copies, the handle fills ``released`` and ``release_event``), and :class:`Slot`
  (its queue, fence and weight views);
- handle -> prefetcher: the :class:`PrefetchHooks` callables the prefetcher hands every handle.

``PrefetchJob``, ``PrefetchHooks``, ``Slot`` and ``expert_list`` are library-internal (no
stability promise); users reach a handle only through :meth:`Prefetcher.prefetch`. The flow of a
prefetch and the CUDA-graph rules are in :mod:`dwdp_comm.prefetch`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch

from .checks import check_int
from .errors import DwdpError, GraphCaptureError, SlotStillHeldError, bad_arg, bad_type

if TYPE_CHECKING:
    from .layout import ExpertLayout
    from .store import WeightStore
    from .telemetry import PrefetchRecorder

__all__ = ["PrefetchHandle", "PrefetchHooks", "PrefetchJob", "Slot", "expert_list"]


class PrefetchJob:
    """Library-internal: the state of one prefetch, shared by its handle and its prefetcher.

    Attributes
    ----------
    layer : int
    fetched : tuple of int
        The remote experts it copies (sorted).
    after : list
        Events its copies wait for besides the slot's fence (the caller's stream, a capture's fork).
    capture : int or None
        The CUDA graph capture it was recorded in (None: eager).
    ready : event or None
        Completion of its copies; set by the prefetcher when it submits them (None: still queued).
    released : bool
        Set by :meth:`PrefetchHandle.release`.
    release_event : event or None
        The consume point recorded at release (None: none recorded).
    recorder, record : PrefetchRecorder and its record, or None
        Its telemetry while the prefetcher records (set by the prefetcher, before submission).
    complete : bool
        It fetches every remote expert (the default), so no expert can be absent.
    slot_free : bool
        It copies nothing and no view of it reads the slot (every view in this rank's heap: a group
        of one in composite mode): no copy job, no release event, the slot's fence untouched.
    """

    __slots__ = ("layer", "fetched", "after", "capture", "ready", "released", "release_event", "recorder",
                 "record", "complete", "slot_free")

    def __init__(self, layer: int, fetched: tuple[int, ...], after: list, capture: int | None = None):
        self.layer, self.fetched, self.after, self.capture = layer, fetched, after, capture
        self.ready = None
        self.released = False
        self.release_event = None
        self.recorder: PrefetchRecorder | None = None
        self.record = None
        self.complete = False
        self.slot_free = False


@dataclass(frozen=True)
class PrefetchHooks:
    """Library-internal: what a handle calls back into the prefetcher that made it (one per prefetcher).

    Attributes
    ----------
    check_open : callable ``() -> None``
        Raises :class:`~dwdp_comm.errors.ClosedError` once the prefetcher or its store was closed.
    is_closed : callable ``() -> bool``
        Whether the prefetcher was closed.
    capture_id : callable ``(*, stream) -> int | None``
        The CUDA graph capture ``stream`` is part of (the backend's ``capture_id``).
    record_event : callable ``(*, stream) -> event``
        Records an event on ``stream`` (the backend's ``record_event``).
    released : callable ``(slot) -> None``
        A job of ``slot`` was released: retire it and submit the slot's next job. Never blocks.
    """

    check_open: Callable[[], None]
    is_closed: Callable[[], bool]
    capture_id: Callable[..., Any]
    record_event: Callable[..., Any]
    released: Callable[[Slot], None]


class Slot:
    """Library-internal: one slot of a prefetcher's ring, its queue of jobs and its weight views.

    Attributes
    ----------
    index : int
    buffer
        The backend buffer (``store.slot_nbytes`` bytes) the copies write.
    queue : deque of PrefetchJob
        Front: the job whose data is (being) in the slot; the others wait for its release.
    fence : list
        Events the next writer waits for: the last copy done, the last release.
    """

    def __init__(self, index: int, buffer: Any, store: WeightStore, backend: Any):
        self.index = index
        self.buffer = buffer
        self.queue: deque[PrefetchJob] = deque()
        self.fence: list = []
        self._store, self._backend = store, backend
        self._views: dict[tuple[int, str], tuple[torch.Tensor, list]] = {}
        self._composites: list = []

    def retire_released(self) -> None:
        """Drop released jobs from the front; the last submitted one's events become the fence."""
        while self.queue and self.queue[0].released:
            job = self.queue.popleft()
            if job.ready is not None and not job.slot_free:  # a slot-free job neither wrote nor read it
                self.fence = [ev for ev in (job.ready, job.release_event) if ev is not None]
            # A job released before it was submitted is cancelled: it never writes.

    def next_to_submit(self) -> PrefetchJob | None:
        """The front job when it still waits for its copies to be submitted, else None."""
        if self.queue and self.queue[0].ready is None:
            return self.queue[0]
        return None

    def view(self, layer: int, name: str) -> tuple[torch.Tensor, list]:
        """(full tensor, segments) of ``name`` in this slot for ``layer``; built once, then cached.
        Host-side only (maps memory in composite mode); never blocks on the device."""
        key = (layer, name)
        hit = self._views.get(key)
        if hit is not None:
            return hit
        view = self._store.slot_view(layer, name)  # the store owns placement: it says which pieces
        if view.mode == "gather":
            (piece,) = view.pieces
            full = view.typed(self.buffer.tensor(piece.offset, piece.nbytes))
            segments = [(0, full)]
        else:
            buffers = {"slot": self.buffer, "heap": self._store.heap.local}
            comp = self._backend.compose([(buffers[p.source], p.offset, p.nbytes) for p in view.pieces])
            self._composites.append(comp)
            full = view.typed(comp.tensor())
            # Slices of the composite: the local piece is never the heap tensor itself.
            segments = [(p.first, full[p.first:p.first + p.count]) for p in view.pieces]
        self._views[key] = (full, segments)
        return full, segments

    def drop_views(self) -> None:
        """Forget the cached views (composites are unmapped when the views handed out so far go)."""
        for comp in self._composites:
            comp.close()
        self._composites.clear()
        self._views.clear()

    def free(self) -> None:
        """Drop the views and the queue and free the buffer (the prefetcher is closing)."""
        self.drop_views()
        self.queue.clear()
        self.buffer.close()


class PrefetchHandle:
    """One prefetch of one layer into one slot. Made by :meth:`Prefetcher.prefetch`.

    Attributes
    ----------
    layer : int
    slot : int
        Index of the ring slot it occupies.
    """

    def __init__(self, hooks: PrefetchHooks, job: PrefetchJob, slot: Slot, layout: ExpertLayout):
        self._hooks, self._job, self._slot, self._layout = hooks, job, slot, layout
        self.layer, self.slot = job.layer, slot.index
        self._waited = False

    # ---- state ---------------------------------------------------------------------------------
    @property
    def is_submitted(self) -> bool:
        """True once its copies were handed to the copy engine (False while the slot is held)."""
        return self._job.ready is not None

    @property
    def is_done(self) -> bool:
        """True once every copy of this prefetch completed. Never blocks. Refused (GraphCaptureError)
        for a captured handle, whose copies run only when the graph replays."""
        if self._job.capture is not None:
            raise GraphCaptureError(f"is_done of the prefetch of layer {self.layer}: it was recorded in a CUDA "
                                    "graph capture and runs only when the graph replays")
        return self._job.ready is not None and self._job.ready.is_done

    @property
    def capture(self) -> int | None:
        """The id of the CUDA graph capture this prefetch was recorded in (None: eager)."""
        return self._job.capture

    @property
    def released(self) -> bool:
        """True after :meth:`release`."""
        return self._job.released

    @property
    def present_experts(self) -> tuple[int, ...]:
        """Global experts whose weights this handle holds: the local ones and the fetched ones."""
        lay = self._layout
        return tuple(sorted(set(lay.local_experts) | set(self._job.fetched)))

    def is_present(self, expert: int) -> bool:
        """True when ``expert``'s weights are local or were fetched by this handle."""
        lay = self._layout
        return lay.is_local(expert) or expert in self._fetched_set

    @property
    def _fetched_set(self) -> frozenset:
        s = getattr(self, "_fs", None)
        if s is None:  # built on first use: most handles never ask
            s = self._fs = frozenset(self._job.fetched)
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
            the current stream). Any value is accepted and ignored on ``sim`` (the host is the only stream).

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
        if self._job.ready is None:
            holder = self._slot.queue[0]
            raise SlotStillHeldError(
                f"prefetch of layer {self.layer} cannot start: slot {self.slot} is still held by the handle of "
                f"layer {holder.layer}; release() that handle first (or use a larger depth)")
        if self._job.record is None:
            self._job.ready.wait(stream=stream)
        else:  # time points on the consumer stream around the wait: the exposed wait
            tel = self._job.recorder
            before = tel.mark(stream)
            self._job.ready.wait(stream=stream)
            tel.waited(self._job.record, before, tel.mark(stream))
        self._waited = True

    def synchronize(self) -> None:
        """Block the host until the copies completed (for tests and benchmarks).

        Unlike :meth:`wait` it does not make :meth:`weights` readable; it raises
        :class:`~dwdp_comm.errors.SlotStillHeldError` as :meth:`wait` does.
        """
        self._check_usable("synchronize")
        if self._job.capture is not None:
            raise GraphCaptureError(f"synchronize() of the prefetch of layer {self.layer}: it was recorded in a CUDA "
                                    "graph capture; synchronize the stream the graph replays on instead")
        if self._job.ready is None:
            self.wait()  # raises SlotStillHeldError
        self._job.ready.synchronize()

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
        self._hooks.check_open()
        if self._job.released:
            raise DwdpError(f"handle of layer {self.layer} released twice")
        cap = self._hooks.capture_id(stream=stream)
        if cap is not None and cap != self._job.capture:
            raise GraphCaptureError(
                f"release() of the prefetch of layer {self.layer} inside a CUDA graph capture, but it was "
                f"{'issued outside any capture' if self._job.capture is None else 'recorded in another capture'}; "
                "release it outside (DwdpPipeline.prepare_capture() releases a pipeline's handles before capturing)")
        if self._job.slot_free or (self._job.capture is not None and cap is None):
            self._job.release_event = None  # nothing read the slot / abandoned capture: nothing to order after
        else:
            self._job.release_event = self._hooks.record_event(stream=stream)
        self._job.released = True
        if self._job.record is not None:
            self._job.recorder.released(self._job.record, stream)
        self._hooks.released(self._slot)

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
        return self._slot.view(self.layer, name)[0]

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
        return list(self._slot.view(self.layer, name)[1])

    # ---- helpers -------------------------------------------------------------------------------
    def _check_same_capture(self, stream: Any, what: str) -> None:
        cap = self._hooks.capture_id(stream=stream)
        if cap == self._job.capture:
            return
        if self._job.capture is None:
            raise GraphCaptureError(
                f"{what}() inside a CUDA graph capture on the prefetch of layer {self.layer}, which was issued "
                "before the capture: its copies are not in the graph, so a replay would read whatever the slot "
                "holds. Issue the prefetch inside the capture (DwdpPipeline.begin() does, after prepare_capture())")
        if cap is None:
            raise GraphCaptureError(
                f"{what}() outside a CUDA graph capture on the prefetch of layer {self.layer}, which was recorded "
                "in a capture: its copies run only when the graph replays; wait on it inside the capture")
        raise GraphCaptureError(f"{what}() on the prefetch of layer {self.layer} inside CUDA graph capture {cap}, "
                                f"but it was recorded in capture {self._job.capture}")

    def _check_usable(self, what: str) -> None:
        self._hooks.check_open()
        if self._job.released:
            raise DwdpError(f"{what}() on the handle of layer {self.layer} after release()")

    def _check_readable(self) -> None:
        self._check_usable("weights")
        if not self._waited:
            raise DwdpError(f"weights() of layer {self.layer} before wait(): call handle.wait(stream=...) first")

    def _check_present(self, experts: Iterable[int] | None) -> None:
        if experts is None and self._job.complete:
            return  # every remote expert fetched (the default): nothing can be absent
        lay = self._layout
        if experts is None:
            absent = [e for e in lay.remote_experts if e not in self._fetched_set]
        else:
            wanted = expert_list(experts, lay.num_experts)
            absent = sorted({e for e in wanted if not lay.is_local(e) and e not in self._fetched_set})
        if absent:
            shown = absent[:16] + (["..."] if len(absent) > 16 else [])
            raise bad_arg("experts", f"absent experts {shown}" if experts is not None else "all experts (default)",
                          "experts this handle fetched",
                          f"layer {self.layer} was prefetched with experts=...; pass experts= with the ones you read")

    def __enter__(self) -> "PrefetchHandle":
        return self

    def __exit__(self, *exc) -> None:
        if not self._job.released and not self._hooks.is_closed():
            self.release()

    def __repr__(self) -> str:
        state = ("released" if self._job.released else "captured" if self._job.capture is not None else
                 "done" if self.is_done else "in flight" if self.is_submitted else "waiting for its slot")
        return f"PrefetchHandle(layer={self.layer}, slot={self.slot}, {state})"


def expert_list(experts: Any, num_experts: int) -> list[int]:
    """Library-internal: ``experts`` (an iterable of ints, or a 1-D integer tensor or array) as a list
    of ints in ``[0, num_experts)``; InvalidArgumentError naming ``experts`` otherwise."""
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
        out.append(check_int("experts", e, low=0, high=num_experts - 1, expected=f"ints in [0, {num_experts})"))
    return out
