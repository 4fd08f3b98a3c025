"""What both GPU backends (cuda_ipc, nvshmem) share: the probe, the device, events, local buffers,
synchronisation and the leak report."""

from __future__ import annotations

import os
import weakref
from typing import Any, Callable, Sequence

import torch

from ...errors import BackendUnavailableError, ClosedError
from ...interop.streams import resolve_stream
from ..base import Backend
from .driver import bindings_reason, check, load, log, set_device
from .memory import Alloc, DeviceBuffer, MallocAlloc
from .streams import CudaEvent, stream_capture_id
from .timing import CudaTimer

__all__ = ["cuda_probe", "CudaBackendBase"]


# ---- common backend part --------------------------------------------------------------------------
def cuda_probe(package_reason: Callable[[], str | None] | None = None) -> str | None:
    """Shared part of the GPU backends' ``probe()``: cuda.bindings, a CUDA device, POSIX."""
    if os.name != "posix":
        return "needs Linux (POSIX file descriptors for handle exchange)"
    reason = bindings_reason()
    if reason is not None:
        return reason
    try:
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return "no CUDA device is visible to torch (torch.cuda.is_available() is False); use backend='sim' on CPUs"
    except Exception as exc:
        return f"torch cannot query CUDA devices: {exc}"
    if package_reason is not None:
        return package_reason()
    return None


class CudaBackendBase(Backend):
    """What both GPU backends share: the device, events, local buffers, synchronisation, leak report."""

    alloc_alignment = 256

    def __init__(self, comm):
        self.comm = comm
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"backend {self.name!r}: no CUDA device visible to torch")
        self.device_index = torch.cuda.current_device()
        self.device = torch.device("cuda", self.device_index)
        set_device(self.device_index)
        self._live: weakref.WeakSet = weakref.WeakSet()
        self._closed = False

    def track(self, alloc: Alloc) -> None:
        """Count ``alloc`` among this backend's live allocations (the leak report at close)."""
        self._live.add(alloc)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self.name} backend used after close()")

    def record_event(self, *, stream: Any = None) -> CudaEvent:
        """A CUDA event recorded now on ``stream`` (None: the current torch stream). Non-blocking.
        Its ``capture`` says which CUDA graph capture, if any, it was recorded in."""
        capture = self.capture_id(stream=stream)  # before resolving: None takes the fast path
        return CudaEvent().record(resolve_stream(stream), capture)

    def capture_id(self, *, stream: Any = None) -> int | None:
        """The id of the CUDA graph capture ``stream`` (None: the current torch stream) is part of,
        or None. Never blocks; a capture invalidated by an earlier error raises
        :class:`~dwdp_comm.errors.GraphCaptureError`."""
        if stream is None and torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():
            return None  # the common eager case without a cuda.bindings call
        return stream_capture_id(resolve_stream(stream))

    def timer(self):
        """The telemetry clock (:class:`~dwdp_comm.backends.cuda.timing.CudaTimer`), made on first use
        (which synchronizes the device once)."""
        if getattr(self, "_timer", None) is None:
            self._timer = CudaTimer()
        return self._timer

    def alloc_buffer(self, nbytes: int, boundaries: Sequence[int] = ()) -> DeviceBuffer:
        """A local ``cudaMalloc`` buffer of ``nbytes`` on this rank's GPU (not collective)."""
        self._check_open()
        return DeviceBuffer(MallocAlloc(nbytes, self.device_index), nbytes, tracker=self)

    def synchronize(self) -> None:
        """``cudaDeviceSynchronize``: every copy and kernel of this process on its GPU finished."""
        rt, _ = load()
        check(rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def _leak_report(self) -> None:
        alive = [a for a in list(self._live) if not a.freed]
        if alive:
            total = sum(a.nbytes for a in alive)
            log.warning("dwdp_comm: %s backend closed with %d device allocation(s) (%.1f MiB) still referenced by "
                        "buffers that were not closed or by tensor views; they are freed when those go",
                        self.name, len(alive), total / 2**20)

    def close(self) -> None:
        """Report device allocations still referenced (a leak). Local; a second call does nothing,
        as for every ``close()`` of the library."""
        if self._closed:
            return
        self._closed = True
        self._leak_report()
