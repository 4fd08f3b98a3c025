"""CUDA streams and events, and the capture id of a stream (CUDA graph capture)."""

from __future__ import annotations

from typing import Any

from ...errors import GraphCaptureError
from ...interop.streams import resolve_stream
from ..base import Event
from .driver import CudaError, bindings, check, load

__all__ = ["CudaEvent", "CudaStream", "stream_capture_id"]


# ---- stream capture ---------------------------------------------------------------------------------
_CAPTURE_NONE, _CAPTURE_ACTIVE, _CAPTURE_INVALIDATED = 0, 1, 2  # cudaStreamCaptureStatus


def stream_capture_id(stream: int) -> int | None:
    """The id of the CUDA graph capture sequence ``stream`` takes part in, None when it is not
    capturing (``cudaStreamGetCaptureInfo``; ids are unique over the process's lifetime).

    Raises
    ------
    GraphCaptureError
        The capture was invalidated by an earlier failed call inside it, or ``stream`` is the legacy
        default stream while another stream captures (``cudaErrorStreamCaptureImplicit``).
    """
    rt, _ = load()
    res = rt.cudaStreamGetCaptureInfo(stream)
    if int(res[0]) != 0:
        err = CudaError("cudaStreamGetCaptureInfo", res[0], f"stream 0x{stream:x}")
        raise GraphCaptureError(f"{err}; the legacy default stream cannot be used while another stream captures a "
                                "CUDA graph: pass the capturing stream") from err
    status = int(res[1])
    if status == _CAPTURE_NONE:
        return None
    if status == _CAPTURE_INVALIDATED:
        raise GraphCaptureError(f"the CUDA graph capture of stream 0x{stream:x} was invalidated by an earlier error "
                                "inside it; end the capture (it fails) and capture again")
    return int(res[2])


def _refuse_captured(ev: "CudaEvent", what: str) -> None:
    if ev.capture is not None:
        raise GraphCaptureError(f"{what} on an event recorded during a CUDA graph capture: it completes only when the "
                                "graph replays; synchronize the stream the graph replays on instead")


# ---- events and streams ---------------------------------------------------------------------------
class CudaEvent(Event):
    """A CUDA event (``cudaEventDisableTiming``). ``wait`` never blocks the host.

    Attributes
    ----------
    handle : int
        The raw ``cudaEvent_t``, for use with other libraries.
    capture : int or None
        The id of the CUDA graph capture it was recorded in (None: recorded eagerly). A captured
        event only orders work inside its capture: ``synchronize`` and ``is_done`` refuse it.
    """

    __slots__ = ("_ev", "handle", "capture")

    def __init__(self):
        rt, _ = load()
        self._ev = check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")
        self.handle = int(self._ev)
        self.capture = None

    @property
    def raw(self):
        """The ``cudaEvent_t`` object, for cuda.bindings calls."""
        return self._ev

    def record(self, stream: int, capture: int | None = None) -> "CudaEvent":
        """Record on ``stream``; ``capture`` is the id of the capture ``stream`` is part of (the caller knows it)."""
        rt, _ = load()
        check(rt.cudaEventRecord(self._ev, stream), "cudaEventRecord", f"on stream 0x{stream:x}")
        self.capture = capture
        return self

    def wait(self, *, stream: Any = None) -> None:
        """Make ``stream`` (any kind :func:`~dwdp_comm.interop.streams.resolve_stream` takes;
        None: the current torch stream) wait for this event. Returns at once."""
        rt, _ = load()
        s = resolve_stream(stream)
        check(rt.cudaStreamWaitEvent(s, self._ev, 0), "cudaStreamWaitEvent", f"stream 0x{s:x}")

    def synchronize(self) -> None:
        """Block the host until the event completed; a failed copy raises :class:`CudaError`."""
        _refuse_captured(self, "synchronize()")
        rt, _ = load()
        check(rt.cudaEventSynchronize(self._ev), "cudaEventSynchronize",
              "a copy or kernel before this event failed")

    @property
    def is_done(self) -> bool:
        _refuse_captured(self, "is_done")
        rt, _ = load()
        err = rt.cudaEventQuery(self._ev)[0]
        if err == rt.cudaError_t.cudaSuccess:
            return True
        if err == rt.cudaError_t.cudaErrorNotReady:
            return False
        raise CudaError("cudaEventQuery", err)

    def __del__(self):
        # Safe while pending: CUDA releases the event once the device passed it.
        try:
            rt = bindings.rt
            if rt is not None:
                rt.cudaEventDestroy(self._ev)
        except Exception:
            pass


class CudaStream:
    """A non-blocking stream (no implicit ordering with the legacy default stream)."""

    def __init__(self, priority: int = 0):
        rt, _ = load()
        self._s = check(rt.cudaStreamCreateWithPriority(rt.cudaStreamNonBlocking, priority),
                        "cudaStreamCreateWithPriority")
        self.handle = int(self._s)

    @property
    def raw(self):
        return self._s

    def synchronize(self) -> None:
        rt, _ = load()
        check(rt.cudaStreamSynchronize(self._s), "cudaStreamSynchronize")

    def close(self) -> None:
        if self._s is not None:
            rt, _ = load()
            check(rt.cudaStreamDestroy(self._s), "cudaStreamDestroy")
            self._s = None
