"""What both GPU backends share: checked cuda.bindings calls, streams, events, device memory, VMM
primitives, the peer-access check, and the copy-engine executor.

Conventions
-----------
* cuda.bindings calls return ``(err, *values)``; :func:`check` turns a non-success ``err`` into a
  :class:`CudaError` naming the API and the ``cudaError_t`` / ``CUresult`` name.
* Each rank is one process driving one GPU: ``torch.cuda.set_device(local_rank)`` happens before
  the backend is created, and the backend uses that device for everything.
* Device memory is owned by small allocation objects (:class:`MallocAlloc`, :class:`VmmAlloc`,
  :class:`ForeignAlloc`). Buffers and every tensor view hold a reference; the memory is freed when
  the last of them goes, so closing a buffer never unmaps memory under a live tensor.
* cuda.bindings is imported on first use only (``import dwdp_comm`` needs no GPU package).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..engine_options import ENGINE_OPTIONS, SYNC_MODES, parse_engine_options  # noqa: F401 (one rule, also the model's)
from ..errors import (gathered_error, BackendUnavailableError, ClosedError, CollectiveMismatchError, DwdpError,
                      GraphCaptureError, InvalidArgumentError, PeerAccessError, bad_arg)
from ..interop import MissingDependencyError
from ..interop.streams import resolve_stream
from ..interop.torch import tensor_from_ptr
from ..planner import CopyPlan
from .base import Backend, Buffer, Composite, CopyEngine, Event

__all__ = ["load", "check", "CudaError", "CudaEvent", "CudaStream", "DeviceBuffer", "MallocAlloc", "VmmAlloc",
           "ForeignAlloc", "CudaComposite", "CopyExecutor", "CudaBackendBase", "parse_engine_options",
           "peer_access_problems", "pidfd_getfd", "bindings_reason", "agree", "raise_gathered", "SyncFlags",
           "create_sync_flags", "build_sync_program", "SyncProgram", "MEMOP_DTYPE", "SYNC_MODES", "ENGINE_OPTIONS",
           "stream_capture_id"]

log = logging.getLogger("dwdp_comm")

_rt = None
_dr = None


def bindings_reason() -> str | None:
    """Why cuda.bindings cannot be used here (None when it imports)."""
    try:
        from cuda.bindings import driver, runtime  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return (f"cannot import cuda.bindings ({type(exc).__name__}: {exc}); install cuda-python "
                "(pip install 'cuda-python>=13,<14' for CUDA 13 drivers, '>=12.8,<13' for CUDA 12)")
    return None


def load():
    """``(cuda.bindings.runtime, cuda.bindings.driver)``, imported on first use."""
    global _rt, _dr
    if _rt is None:
        reason = bindings_reason()
        if reason is not None:
            raise MissingDependencyError(reason)
        from cuda.bindings import driver, runtime
        _rt, _dr = runtime, driver
    return _rt, _dr


class CudaError(DwdpError, RuntimeError):
    """A CUDA runtime or driver call failed.

    Attributes
    ----------
    api : str
        The call, e.g. ``"cudaMemcpyAsync"``.
    code : int
        The ``cudaError_t`` / ``CUresult`` value; ``name`` is its name.
    """

    def __init__(self, api: str, err: Any, context: str = "", name: str | None = None):
        self.api = api
        self.code = int(err)
        self.name = name or getattr(err, "name", None) or str(err)
        self.context = context
        msg = f"{api} failed: {self.name} ({self.code})"
        super().__init__(msg + (f": {context}" if context else ""))

    def __reduce__(self):
        # Rebuilt from its fields, so that it crosses process boundaries (testing.launch's pipe).
        return (type(self), (self.api, self.code, self.context, self.name))


def check(result: Any, api: str, context: str = ""):
    """Unpack a cuda.bindings result tuple: raise :class:`CudaError` on failure, else return the
    value (None, one value, or a tuple of values)."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if int(err) != 0:
        raise CudaError(api, err, context)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def set_device(index: int) -> None:
    """Make ``index`` current for cuda.bindings on this thread and create its primary context
    (driver-API calls such as cuMemCreate need a current context)."""
    rt, dr = load()
    check(dr.cuInit(0), "cuInit")
    check(rt.cudaSetDevice(index), "cudaSetDevice", f"device {index}")
    check(rt.cudaFree(0), "cudaFree(0)", "creating the primary context")


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

    def record(self, stream: int, capture: int | None = None) -> "CudaEvent":
        """Record on ``stream``; ``capture`` is the id of the capture ``stream`` is part of (the caller knows it)."""
        rt, _ = load()
        check(rt.cudaEventRecord(self._ev, stream), "cudaEventRecord", f"on stream 0x{stream:x}")
        self.capture = capture
        return self

    def wait(self, stream: Any = None) -> None:
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
            if _rt is not None:
                _rt.cudaEventDestroy(self._ev)
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


# ---- device memory --------------------------------------------------------------------------------
class _Alloc:
    """Device memory, freed when the last reference (buffer or tensor view) goes."""

    kind = "device memory"
    freed = True  # until __init__ completes: a half-built object frees nothing

    def __init__(self, ptr: int, nbytes: int, device: int):
        self.ptr, self.nbytes, self.device = int(ptr), int(nbytes), int(device)
        self.freed = False

    def free(self) -> None:
        if not self.freed:
            self.freed = True
            self._free()

    def _free(self) -> None:
        raise NotImplementedError

    def __del__(self):
        try:
            self.free()
        except Exception as exc:  # at interpreter exit CUDA may already be gone
            log.debug("dwdp_comm: freeing %s failed: %r", self.kind, exc)


class MallocAlloc(_Alloc):
    """``cudaMalloc`` memory (exportable with legacy ``cudaIpcGetMemHandle``)."""

    kind = "cudaMalloc memory"

    def __init__(self, nbytes: int, device: int):
        rt, _ = load()
        ptr = check(rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc", f"{nbytes} bytes on GPU {device}")
        super().__init__(int(ptr), nbytes, device)

    def _free(self) -> None:
        rt, _ = load()
        check(rt.cudaFree(self.ptr), "cudaFree")  # cudaFree waits for work in flight


class ForeignAlloc(_Alloc):
    """Memory another library owns (NVSHMEM); ``keepalive`` is referenced until freed by its owner."""

    kind = "foreign device memory"

    def __init__(self, ptr: int, nbytes: int, device: int, keepalive: Any = None):
        super().__init__(ptr, nbytes, device)
        self.keepalive = keepalive

    def _free(self) -> None:
        self.keepalive = None


def _vmm_prop(device: int, exportable: bool):
    _, dr = load()
    prop = dr.CUmemAllocationProp()
    prop.type = dr.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = dr.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device
    if exportable:
        prop.requestedHandleTypes = dr.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    return prop


def vmm_granularity(device: int) -> int:
    """``cuMemGetAllocationGranularity`` (minimum) for exportable device memory: offsets and sizes
    of every map must be multiples of it (2 MiB on Hopper)."""
    _, dr = load()
    return int(check(dr.cuMemGetAllocationGranularity(
        _vmm_prop(device, True), dr.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
        "cuMemGetAllocationGranularity"))


def vmm_set_access(va: int, nbytes: int, device: int) -> None:
    _, dr = load()
    desc = dr.CUmemAccessDesc()
    desc.location.type = dr.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = device
    desc.flags = dr.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    check(dr.cuMemSetAccess(va, nbytes, [desc], 1), "cuMemSetAccess", f"{nbytes} bytes for GPU {device}")


def vmm_reserve(nbytes: int, alignment: int) -> int:
    _, dr = load()
    return int(check(dr.cuMemAddressReserve(nbytes, alignment, 0, 0), "cuMemAddressReserve", f"{nbytes} bytes"))


def segment_sizes(nbytes: int, boundaries: Sequence[int], granularity: int) -> list[int]:
    """Sizes of the segments that ``boundaries`` (offsets, multiples of ``granularity``) cut
    ``[0, nbytes)`` into; ``nbytes`` is rounded up to the granularity first."""
    total = max(_round_up(int(nbytes), granularity), granularity)
    cuts = sorted({int(b) for b in boundaries if 0 < int(b) < total})
    for b in cuts:
        if b % granularity:
            raise bad_arg("boundaries", b, f"offsets that are multiples of the VMM granularity {granularity}")
    edges = [0, *cuts, total]
    return [b - a for a, b in zip(edges, edges[1:])]


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class VmmAlloc(_Alloc):
    """VMM physical allocations (made here with ``cuMemCreate`` or imported from a peer) mapped back
    to back, read-write for this rank's GPU, in one range of its own.

    The range is cut into *segments*, one physical allocation each. Composites map whole segments
    again elsewhere (``cuMemMap`` at offset 0: drivers may refuse non-zero offsets into an
    allocation, as the 580 driver does), so every piece a composite needs must start and end on a
    segment boundary; callers say where with ``boundaries``.

    Attributes
    ----------
    segments : list of (offset, nbytes, handle)
        The physical allocations, in address order.
    """

    kind = "VMM memory"

    def __init__(self, handles: Sequence[Any], sizes: Sequence[int], device: int, granularity: int, *,
                 imported: bool = False):
        _, dr = load()
        self.imported = imported
        nbytes = sum(sizes)
        self.segments: list[tuple[int, int, Any]] = []
        try:
            va = vmm_reserve(nbytes, granularity)
        except BaseException:
            for h in handles:
                dr.cuMemRelease(h)
            raise
        mapped = []
        try:
            off = 0
            for h, n in zip(handles, sizes):
                check(dr.cuMemMap(va + off, n, 0, h, 0), "cuMemMap", f"segment of {n} bytes at {off}")
                mapped.append((va + off, n))
                self.segments.append((off, n, h))
                off += n
            vmm_set_access(va, nbytes, device)
        except BaseException:
            for a, n in mapped:
                dr.cuMemUnmap(a, n)
            dr.cuMemAddressFree(va, nbytes)
            for h in handles:
                dr.cuMemRelease(h)
            raise
        super().__init__(va, nbytes, device)

    @property
    def handle(self):
        """The physical allocation of a single-segment range."""
        if len(self.segments) != 1:
            raise DwdpError(f"this VMM range has {len(self.segments)} segments; use .segments")
        return self.segments[0][2]

    @classmethod
    def create(cls, nbytes: int, device: int, granularity: int, *, exportable: bool,
               boundaries: Sequence[int] = ()) -> "VmmAlloc":
        """``cuMemCreate`` one allocation per segment of ``nbytes`` (cut at ``boundaries``) and map them."""
        _, dr = load()
        sizes = segment_sizes(nbytes, boundaries, granularity)
        handles = []
        try:
            for n in sizes:
                handles.append(check(dr.cuMemCreate(n, _vmm_prop(device, exportable), 0), "cuMemCreate",
                                     f"{n} bytes on GPU {device}"))
        except BaseException:
            for h in handles:
                dr.cuMemRelease(h)
            raise
        return cls(handles, sizes, device, granularity)

    @classmethod
    def import_fds(cls, fds: Sequence[int], sizes: Sequence[int], device: int, granularity: int) -> "VmmAlloc":
        """Import POSIX-fd shareable handles (the caller closes the fds) and map them back to back."""
        _, dr = load()
        handles = []
        try:
            for fd in fds:
                handles.append(check(dr.cuMemImportFromShareableHandle(
                    fd, dr.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                    "cuMemImportFromShareableHandle"))
        except BaseException:
            for h in handles:
                dr.cuMemRelease(h)
            raise
        return cls(handles, sizes, device, granularity, imported=True)

    @classmethod
    def import_fd(cls, fd: int, nbytes: int, device: int, granularity: int) -> "VmmAlloc":
        """Import one POSIX-fd handle of ``nbytes`` (the caller closes ``fd``)."""
        return cls.import_fds([fd], [nbytes], device, granularity)

    def export_fds(self) -> list[int]:
        """One POSIX fd per segment (close them once every peer imported them)."""
        _, dr = load()
        return [int(check(dr.cuMemExportToShareableHandle(
            h, dr.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
            "cuMemExportToShareableHandle")) for _, _, h in self.segments]

    def export_fd(self) -> int:
        """A POSIX fd for a single-segment range."""
        self.handle  # raises for several segments
        return self.export_fds()[0]

    @property
    def segment_sizes(self) -> list[int]:
        return [n for _, n, _ in self.segments]

    def pieces(self, offset: int, nbytes: int) -> list[tuple[Any, int]]:
        """``(handle, size)`` of the whole segments that exactly cover ``[offset, offset + nbytes)``."""
        out, end = [], offset + nbytes
        for off, n, h in self.segments:
            if off >= end or off + n <= offset:
                continue
            if off < offset or off + n > end:
                cuts = [o for o, _, _ in self.segments] + [self.nbytes]
                raise bad_arg("pieces", (offset, nbytes), f"a range that starts and ends on segment boundaries "
                              f"{cuts} (pass them as boundaries= when allocating)")
            out.append((h, n))
        return out

    def _free(self) -> None:
        rt, dr = load()
        # Unmapping is not stream-ordered: let work that may still touch the range finish first.
        rt.cudaDeviceSynchronize()
        for off, n, _ in self.segments:
            check(dr.cuMemUnmap(self.ptr + off, n), "cuMemUnmap")
        check(dr.cuMemAddressFree(self.ptr, self.nbytes), "cuMemAddressFree")
        for _, _, h in self.segments:  # physical memory goes with its last mapping
            check(dr.cuMemRelease(h), "cuMemRelease")


class DeviceBuffer(Buffer):
    """A region of device memory with zero-copy ``uint8`` torch views.

    Attributes
    ----------
    nbytes : int
        Usable bytes (the allocation may be rounded up to the VMM granularity).
    ptr : int
        Device address of byte 0 (raises :class:`ClosedError` after ``close``).
    """

    def __init__(self, alloc: _Alloc, nbytes: int | None = None, tracker: "CudaBackendBase | None" = None):
        self._alloc: _Alloc | None = alloc
        self.nbytes = alloc.nbytes if nbytes is None else int(nbytes)
        self.device = alloc.device
        if tracker is not None:
            tracker._live.add(alloc)

    @property
    def alloc(self) -> _Alloc:
        if self._alloc is None:
            raise ClosedError("buffer used after close()")
        return self._alloc

    @property
    def ptr(self) -> int:
        return self.alloc.ptr

    def tensor(self, offset: int = 0, nbytes: int | None = None) -> torch.Tensor:
        """``uint8`` view ``[nbytes]`` of bytes ``[offset, offset + nbytes)``, zero copy; it keeps the
        memory alive (even past ``close()``)."""
        alloc = self.alloc
        nbytes = self.nbytes - offset if nbytes is None else nbytes
        if offset < 0 or nbytes < 0 or offset + nbytes > self.nbytes:
            raise bad_arg("offset/nbytes", (offset, nbytes), f"a range inside [0, {self.nbytes})")
        return tensor_from_ptr(alloc.ptr + offset, nbytes, alloc.device, owner=alloc)

    def close(self) -> None:
        """Drop this buffer's reference: the memory is freed now, or when its last view goes."""
        self._alloc = None

    @property
    def closed(self) -> bool:
        return self._alloc is None


# ---- composite views (VMM) --------------------------------------------------------------------------
class _CompositeMapping:
    """A reserved range where pieces of VMM allocations are mapped back to back."""

    def __init__(self, pieces: Sequence[tuple[VmmAlloc, int, int]], device: int, granularity: int):
        _, dr = load()
        self.nbytes = sum(n for _, _, n in pieces)
        self.device = device
        self.ptr, self._maps = 0, []
        segments = [seg for alloc, off, n in pieces for seg in alloc.pieces(off, n)]  # validates first
        self.ptr = vmm_reserve(self.nbytes, granularity)
        try:
            pos = 0
            for handle, n in segments:
                # Whole physical allocations mapped a second time (offset 0): no bytes move.
                check(dr.cuMemMap(self.ptr + pos, n, 0, handle, 0), "cuMemMap", f"composite segment of {n} bytes")
                self._maps.append((self.ptr + pos, n))
                pos += n
            vmm_set_access(self.ptr, self.nbytes, device)
        except BaseException:
            self._unmap()
            raise

    def _unmap(self) -> None:
        _, dr = load()
        for va, n in self._maps:
            dr.cuMemUnmap(va, n)
        self._maps = []
        if self.ptr:
            dr.cuMemAddressFree(self.ptr, self.nbytes)
            self.ptr = 0

    def __del__(self):
        try:
            if self._maps and _rt is not None:
                _rt.cudaDeviceSynchronize()  # not stream-ordered: let readers finish
            self._unmap()
        except Exception as exc:
            log.debug("dwdp_comm: unmapping a composite failed: %r", exc)


class CudaComposite(Composite):
    """Pieces of VMM buffers mapped into one device range: a ``[num_experts, ...]`` view whose local
    experts are the heap pages themselves and whose remote experts are the slot's pages."""

    def __init__(self, pieces: Sequence[tuple[DeviceBuffer, int, int]], device: int, granularity: int):
        parts = []
        for buf, off, n in pieces:
            if n == 0:
                continue
            alloc = buf.alloc
            if not isinstance(alloc, VmmAlloc):
                raise bad_arg("pieces", type(alloc).__name__, "buffers of VMM memory (VmmAlloc)")
            if off % granularity or n % granularity or off + n > alloc.nbytes:
                raise bad_arg("pieces", (off, n), f"offsets and sizes that are multiples of {granularity} "
                              f"inside the buffer ({alloc.nbytes} bytes)")
            parts.append((alloc, off, n))
        if parts:
            self._mapping = _CompositeMapping(parts, device, granularity)
            # The tensor keeps the mapping alive; the mapping keeps the physical pages alive.
            self._tensor = tensor_from_ptr(self._mapping.ptr, self._mapping.nbytes, device, owner=self._mapping)
        else:
            self._mapping = None
            self._tensor = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", device))

    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            raise ClosedError("composite used after close()")
        return self._tensor

    def close(self) -> None:
        """Drop the view; the range is unmapped when no tensor views it any more."""
        self._tensor = None
        self._mapping = None


# ---- fd passing -----------------------------------------------------------------------------------
_SYS_PIDFD_OPEN = 434  # same number on x86_64 and aarch64 (the unified syscall table)
_SYS_PIDFD_GETFD = 438
_libc = None


def pidfd_getfd(pid: int, fd: int) -> int:
    """Duplicate file descriptor ``fd`` of process ``pid`` into this process (Linux >= 5.6).

    Needs ptrace permission over ``pid`` (PTRACE_MODE_ATTACH_REALCREDS): same user and
    ``/proc/sys/kernel/yama/ptrace_scope`` 0, or CAP_SYS_PTRACE (root). Raises ``OSError`` naming
    the errno otherwise.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    if hasattr(os, "pidfd_open"):
        pidfd = os.pidfd_open(pid)
    else:
        pidfd = _libc.syscall(ctypes.c_long(_SYS_PIDFD_OPEN), ctypes.c_long(pid), ctypes.c_long(0))
        if pidfd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"pidfd_open({pid}): {os.strerror(e)}")
    try:
        got = _libc.syscall(ctypes.c_long(_SYS_PIDFD_GETFD), ctypes.c_long(pidfd), ctypes.c_long(fd), ctypes.c_long(0))
        if got < 0:
            e = ctypes.get_errno()
            hint = ""
            if e in (1, 13):  # EPERM, EACCES
                hint = (" (pidfd_getfd needs ptrace permission over the peer: run the ranks as root or with "
                        "CAP_SYS_PTRACE, or set /proc/sys/kernel/yama/ptrace_scope to 0)")
            raise OSError(e, f"pidfd_getfd(pid {pid}, fd {fd}): {os.strerror(e)}{hint}")
        return int(got)
    finally:
        os.close(pidfd)


# ---- the peer-access check ------------------------------------------------------------------------
def _pci_bus_id(device: int) -> str:
    rt, _ = load()
    got = check(rt.cudaDeviceGetPCIBusId(64, device), "cudaDeviceGetPCIBusId")
    if isinstance(got, (bytes, bytearray)):
        got = bytes(got).split(b"\0", 1)[0].decode("ascii", "replace")
    return str(got).split("\0", 1)[0].strip().lower()


def device_info(device: int) -> dict:
    """What peers need to know about this rank's GPU."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "device": device, "pci": _pci_bus_id(device),
            "name": torch.cuda.get_device_name(device)}


def visible_devices() -> dict[str, int]:
    """PCI bus id -> device ordinal of every GPU this process sees."""
    rt, _ = load()
    count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    return {_pci_bus_id(d): d for d in range(int(count))}


def peer_access_problems(infos: list[dict], rank: int, visible: dict[str, int],
                         can_access: Callable[[int, int], bool]) -> list[str]:
    """Pairs (this rank reading a peer on the same host) whose GPUs cannot access each other.

    Pure function (no CUDA): ``can_access(my_device, peer_device)`` is the oracle. A peer GPU this
    process cannot see (``CUDA_VISIBLE_DEVICES``) is not checked here; opening its handle is.
    """
    me = infos[rank]
    out = []
    for r, other in enumerate(infos):
        if r == rank or other["host"] != me["host"] or other["pci"] == me["pci"]:
            continue  # other hosts are the backend's business; the same GPU needs no peer access
        peer_dev = visible.get(other["pci"])
        if peer_dev is None:
            continue
        if not can_access(me["device"], peer_dev):
            out.append(f"rank {rank} (GPU {me['device']}, {me['pci']}) cannot access the memory of rank {r} "
                       f"(GPU {peer_dev}, {other['pci']})")
    return out


def raise_gathered(errors: Sequence[str | None], what: str, exc_type=BackendUnavailableError, hint: str = "") -> None:
    """Raise ``exc_type`` listing every rank's error if any entry of the gathered ``errors`` is set
    (every rank holds the same list, so every rank raises the same error). Built by
    :func:`dwdp_comm.errors.gathered_error`, the library's one builder of agreed errors."""
    err = gathered_error(errors, what, exc_type, hint)
    if err is not None:
        raise err


def agree(comm, error: str | None, what: str, exc_type=BackendUnavailableError, hint: str = "") -> None:
    """Collective: raise ``exc_type`` on every rank, listing every rank's error, if any rank has one
    (:meth:`dwdp_comm.group.Comm.agree` with this module's default error class)."""
    comm.agree(error, what, exc_type, hint)


def check_peer_access(comm, infos: list[dict], backend: str, alternatives: str) -> None:
    """Collective: raise :class:`PeerAccessError` on every rank, naming every pair of GPUs (on one
    host) without peer access."""
    rt, _ = load()

    def can(a: int, b: int) -> bool:
        return bool(check(rt.cudaDeviceCanAccessPeer(a, b), "cudaDeviceCanAccessPeer", f"GPU {a} -> GPU {b}"))

    try:
        problems = peer_access_problems(infos, comm.rank, visible_devices(), can)
        mine = "; ".join(problems) or None
    except DwdpError as exc:
        mine = f"checking peer access failed: {exc}"
    agree(comm, mine, f"backend {backend!r}: the peer-access check", PeerAccessError,
          f"{backend} reads peers' memory directly, which needs peer access (NVLink or PCIe P2P) between every "
          f"pair of GPUs of the group; use {alternatives} instead")


# ---- the copy-engine executor -----------------------------------------------------------------------
class DriverCopyCalls:
    """The driver's copy and stream-memory entry points called through ctypes, from NumPy arrays.

    cuda.bindings converts every argument of every call (about 10-20 us per copy for
    ``cudaMemcpyBatchAsync`` lists of thousands of copies, measured on H200): a layer's plan would
    hold the host, and with it the compute stream's launches, for tens of ms. Here a batch is one
    C call on three ``uint64`` arrays, and a single copy about a microsecond of Python.
    Entry points come from ``cuGetProcAddress``: ``cuMemcpyBatchAsync`` at the CUDA 13 ABI (without
    ``failIdx``; None where the driver predates it), ``cuStreamBatchMemOp`` at the CUDA 12 ABI (the
    ``_v2`` entry point, which needs no device attribute for 32-bit operations), called on arrays of
    :data:`MEMOP_DTYPE`.
    """

    _instance: "DriverCopyCalls | None" = None

    def __init__(self):
        _, dr = load()
        version = int(check(dr.cuDriverGetVersion(), "cuDriverGetVersion"))
        c = ctypes

        def proc(name: str, args: list, min_version: int):
            if version < min_version:
                return None
            err, pfn, _status = dr.cuGetProcAddress(name.encode(), min_version,
                                                     dr.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_DEFAULT)
            if int(err) != 0 or not int(pfn):
                return None
            return c.CFUNCTYPE(c.c_int, *args)(int(pfn))

        self.memcpy = proc("cuMemcpyAsync", [c.c_uint64, c.c_uint64, c.c_size_t, c.c_void_p], 4000)
        self.batch = proc("cuMemcpyBatchAsync", [c.c_void_p, c.c_void_p, c.c_void_p, c.c_size_t, c.c_void_p,
                                                 c.c_void_p, c.c_size_t, c.c_void_p], 13000)
        # CUresult cuStreamBatchMemOp(CUstream, unsigned int count, CUstreamBatchMemOpParams *, unsigned int flags)
        self.memops = proc("cuStreamBatchMemOp", [c.c_void_p, c.c_uint, c.c_void_p, c.c_uint], 12000)
        self._dr = dr

    @classmethod
    def get(cls) -> "DriverCopyCalls":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def batch_attributes(self, overlap_hint: bool):
        """One ``CUmemcpyAttributes`` for every copy of a batch: sources read in stream order (after
        the job's waits), optionally preferring overlap with compute. Returns (object, address)."""
        dr = self._dr
        attrs = dr.CUmemcpyAttributes()
        attrs.srcAccessOrder = dr.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        if overlap_hint:
            attrs.flags = int(dr.CUmemcpyFlags.CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE)
        return attrs, attrs.getPtr()

    def error(self, code: int, api: str, context: str) -> "CudaError":
        try:
            err = self._dr.CUresult(code)
        except ValueError:
            err = code
        return CudaError(api, err, context)


# ---- stream memory operations: the flags of time-division engines ------------------------------------
# The wait / write members of the 48-byte union CUstreamBatchMemOpParams (cuda.h): operation at 0,
# address at 8, value (32-bit value or 64-bit value64) at 16, flags at 24, alias (driver-internal) at
# 32. tests/test_interop_cpu.py checks this layout against cuda.bindings' own struct.
MEMOP_DTYPE = np.dtype({"names": ["operation", "address", "value", "flags", "alias"],
                        "formats": ["<u4", "<u8", "<u8", "<u4", "<u8"],
                        "offsets": [0, 8, 16, 24, 32], "itemsize": 48})
# CUstreamBatchMemOpType, CUstreamWaitValue_flags, CUstreamWriteValue_flags (checked against the enums)
OP_WAIT_VALUE_32, OP_WRITE_VALUE_32, OP_WAIT_VALUE_64, OP_WRITE_VALUE_64 = 1, 2, 4, 5
WAIT_VALUE_GEQ = 0  # (intN_t)(*addr - value) >= 0: a cyclic greater-or-equal
WRITE_VALUE_DEFAULT = 0  # with a memory fence before the write
MEMOP_MAX = 128  # operations per cuStreamBatchMemOp call (the driver takes fewer than 256)


def issue_memops(stream: int, ops: np.ndarray, what: str) -> None:
    """Enqueue ``ops`` (an array of :data:`MEMOP_DTYPE`) on ``stream`` with ``cuStreamBatchMemOp``,
    in order, at most :data:`MEMOP_MAX` per call; a failure raises :class:`CudaError`."""
    if not len(ops):
        return
    drv = DriverCopyCalls.get()
    if drv.memops is None:
        raise DwdpError("the driver has no cuStreamBatchMemOp (CUDA 12 ABI); use sync='none'")
    ops = np.ascontiguousarray(ops, dtype=MEMOP_DTYPE)
    for a in range(0, len(ops), MEMOP_MAX):
        part = ops[a:a + MEMOP_MAX]
        err = drv.memops(stream, len(part), part.ctypes.data, 0)
        if err:
            raise drv.error(err, "cuStreamBatchMemOp", f"{len(part)} flag operations ({what})")


def stream_memop_bits(device: int) -> int:
    """64 when ``device`` supports 64-bit stream memory operations
    (``CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS``), else 32."""
    _, dr = load()
    dev = check(dr.cuDeviceGet(device), "cuDeviceGet", f"device {device}")
    attr = dr.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS
    return 64 if int(check(dr.cuDeviceGetAttribute(attr, dev), "cuDeviceGetAttribute",
                           "CAN_USE_64_BIT_STREAM_MEM_OPS")) else 32


class SyncFlags:
    """The flag words of one time-division copy engine (``sync="slot"`` or ``"source"``).

    Every rank holds the same array of 8-byte words in symmetric memory. Word ``(key, writer, lane)``
    of rank ``t``'s array holds the progress of copy stream ``lane`` of rank ``writer`` on ``key``
    (``sync="slot"``: one key, everything; ``sync="source"``: key ``s`` = the copies read from rank
    ``s``), as rank ``t`` last heard of it. The writer writes that word in every rank's array (a
    stream write to the peer-mapped address, or an NVSHMEM signal where the peer has no mapping);
    readers only ever wait on their own array. ``G`` probe words at the end serve the handshake.

    Values are monotonic, so no word is ever reset: in job ``j`` (the engine's job sequence number,
    the same on every rank because every rank submits the same jobs) the value ``V(j, k) = j * span
    + k + 1`` means "done with every copy of this key in slots ``<= k`` of job ``j``" and
    ``E(j) = j * span + span - 1`` "done with job ``j``". With 64-bit operations ``span = 2**32``;
    where the GPU lacks them, 32-bit operations on the low half of each word with ``span = 2**16``,
    values modulo ``2**32``, compared cyclically by the GPU (ranks may drift up to ``2**15`` jobs).

    Parameters
    ----------
    mode : {"slot", "source"}
    rank, group_size : int
    num_lanes : int
        Copy streams for peers' copies (the ``streams`` option).
    distribute : {"source", "slot"}
        How copies are spread over lanes (decides which lanes can carry which key).
    bits : {64, 32}
    local_ptr : int
        This rank's array.
    peer_ptrs : list of int or None
        Each rank's array as mapped here (this rank's own at its index); None where not mapped.
    sym_ptr : int, optional
        The symmetric address for ``remote_signal`` (NVSHMEM).
    remote_signal : callable, optional
        ``remote_signal(sym_addr, value, pe, stream)``: set a 64-bit word of an unmapped PE.
    comm : Comm, optional
        For the collective steps (handshake, settle, close).
    owner : object, optional
        The symmetric allocation; its ``close()`` (collective) frees the words.
    """

    WORD = 8

    def __init__(self, *, mode: str, rank: int, group_size: int, num_lanes: int, distribute: str, bits: int,
                 local_ptr: int, peer_ptrs: Sequence[int | None], sym_ptr: int | None = None,
                 remote_signal: Callable | None = None, comm: Any = None, owner: Any = None):
        if mode not in ("slot", "source"):
            raise bad_arg("mode", mode, "'slot' or 'source'")
        if bits not in (32, 64):
            raise bad_arg("bits", bits, "32 or 64")
        if len(peer_ptrs) != group_size:
            raise bad_arg("peer_ptrs", len(peer_ptrs), f"{group_size} entries (one per rank)")
        if any(p is None for p in peer_ptrs) and (remote_signal is None or sym_ptr is None):
            raise bad_arg("remote_signal", None, "a function and sym_ptr when some rank's flags are not mapped")
        self.mode, self.rank, self.group_size, self.num_lanes = mode, int(rank), int(group_size), int(num_lanes)
        self.distribute, self.bits = distribute, int(bits)
        self.local_ptr, self.peer_ptrs = int(local_ptr), [None if p is None else int(p) for p in peer_ptrs]
        self.sym_ptr = int(sym_ptr) if sym_ptr is not None else self.local_ptr
        self.remote_signal, self.comm, self.owner = remote_signal, comm, owner
        self.num_keys = 1 if mode == "slot" else self.group_size
        self.span = 1 << 32 if bits == 64 else 1 << 16
        self.end = self.span - 1
        self.mask = (1 << 64) - 1 if bits == 64 else (1 << 32) - 1
        self.wait_op = OP_WAIT_VALUE_64 if bits == 64 else OP_WAIT_VALUE_32
        self.write_op = OP_WRITE_VALUE_64 if bits == 64 else OP_WRITE_VALUE_32
        self.closed = False

    # -- layout ---------------------------------------------------------------------------------------
    @staticmethod
    def num_words(mode: str, group_size: int, num_lanes: int) -> int:
        keys = 1 if mode == "slot" else group_size
        return keys * group_size * num_lanes + group_size

    @property
    def nbytes(self) -> int:
        return self.WORD * self.num_words(self.mode, self.group_size, self.num_lanes)

    @property
    def max_slots(self) -> int:
        """Most slots a plan may have (``k + 1 < span - 1`` for every slot ``k``)."""
        return self.span - 2

    def word(self, key: int, writer: int, lane: int) -> int:
        return (key * self.group_size + writer) * self.num_lanes + lane

    def probe_word(self, writer: int) -> int:
        return self.num_keys * self.group_size * self.num_lanes + writer

    def value(self, job: int, rel: int) -> int:
        """The word value of ``rel`` (``k + 1`` for slot ``k``, or :attr:`end`) in job ``job``."""
        return (job * self.span + rel) & self.mask

    def lanes_for(self, key: int, writer: int) -> Sequence[int]:
        """The lanes of ``writer`` that may carry ``key``."""
        if self.mode == "source" and self.distribute == "source":
            return (((key - writer - 1) % self.group_size) % self.num_lanes,)
        return range(self.num_lanes)

    def maintained(self, lane: int) -> list[int]:
        """Keys whose word this rank's ``lane`` keeps up to date in every job."""
        if self.mode == "slot":
            return [0]
        return [k for k in range(self.group_size) if k != self.rank and lane in self.lanes_for(k, self.rank)]

    def targets(self, key: int) -> list[int]:
        """Ranks that may wait on ``key`` (under ``"source"`` the source itself never does)."""
        return [t for t in range(self.group_size) if not (self.mode == "source" and t == key)]

    def _ops(self, n: int) -> np.ndarray:
        return np.zeros(n, dtype=MEMOP_DTYPE)

    # -- collective steps -------------------------------------------------------------------------------
    def zero(self) -> None:
        """Set this rank's words to 0 (before any peer writes them: the caller agrees after)."""
        rt, _ = load()
        s = CudaStream()
        try:
            check(rt.cudaMemsetAsync(self.local_ptr, 0, self.nbytes, s.raw), "cudaMemsetAsync", "zeroing sync flags")
            s.synchronize()
        finally:
            s.close()

    def _read_local(self, word: int, count: int, stream: "CudaStream") -> np.ndarray:
        rt, _ = load()
        out = np.zeros(count, dtype=np.uint64)
        check(rt.cudaMemcpyAsync(out.ctypes.data, self.local_ptr + self.WORD * word, self.WORD * count,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.raw), "cudaMemcpyAsync",
              "reading sync flags back")
        stream.synchronize()
        return out & np.uint64(self.mask)

    def _write_local(self, words: Sequence[int], value: int, stream: "CudaStream") -> None:
        """Enqueue writes of ``value`` into this rank's own ``words`` on ``stream``."""
        ops = self._ops(len(words))
        ops["operation"] = self.write_op
        ops["address"] = [self.local_ptr + self.WORD * w for w in words]
        ops["value"] = value & self.mask
        ops["flags"] = WRITE_VALUE_DEFAULT
        issue_memops(stream.handle, ops, "releasing local flags")

    def handshake(self, timeout_s: float = 60.0, poll_s: float = 5e-4) -> str | None:
        """Collective test of the mechanism on the GPU: each rank writes 1 into its probe word on every
        rank (the path job writes take) and waits on a stream until every rank's probe word in its
        own array is >= 1. The host polls the stream (never blocks on it without a bound). Returns
        None, or why it failed (a stream that timed out is released first)."""
        rt, _ = load()
        G, me = self.group_size, self.rank
        s = CudaStream()
        try:
            pw = self.probe_word(me)
            writes = [t for t in range(G) if self.peer_ptrs[t] is not None]
            ops = self._ops(len(writes) + G)
            ops["operation"][:len(writes)] = self.write_op
            ops["address"][:len(writes)] = [self.peer_ptrs[t] + self.WORD * pw for t in writes]
            ops["value"][:len(writes)] = 1
            ops["flags"][:len(writes)] = WRITE_VALUE_DEFAULT
            ops["operation"][len(writes):] = self.wait_op
            ops["address"][len(writes):] = [self.local_ptr + self.WORD * self.probe_word(w) for w in range(G)]
            ops["value"][len(writes):] = 1
            ops["flags"][len(writes):] = WAIT_VALUE_GEQ
            issue_memops(s.handle, ops[:len(writes)], "handshake writes")
            for t in range(G):
                if self.peer_ptrs[t] is None:
                    self.remote_signal(self.sym_ptr + self.WORD * pw, 1, t, s.handle)
            issue_memops(s.handle, ops[len(writes):], "handshake waits")
            deadline = time.monotonic() + timeout_s
            while True:
                err = rt.cudaStreamQuery(s.raw)[0]
                if err == rt.cudaError_t.cudaSuccess:
                    break
                if err != rt.cudaError_t.cudaErrorNotReady:
                    raise CudaError("cudaStreamQuery", err, "the sync-flag handshake stream")
                if time.monotonic() > deadline:
                    side = CudaStream()
                    try:
                        seen = self._read_local(self.probe_word(0), G, side)
                        self._write_local([self.probe_word(w) for w in range(G)], 1, side)
                        side.synchronize()
                        s.synchronize()
                    finally:
                        side.close()
                    missing = [w for w in range(G) if int(seen[w]) < 1]
                    return (f"rank {me} waited {timeout_s:.0f} s for the handshake flags of ranks {missing}: stream "
                            "writes to peer memory did not arrive (or a rank never got here)")
                time.sleep(poll_s)
            got = self._read_local(self.probe_word(0), G, s)
            if any(int(v) != 1 for v in got):
                return f"rank {me} read back handshake flags {got.tolist()}, expected all 1"
        except DwdpError as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            s.close()
        return None

    def settle(self, jobs: int, streams: Sequence["CudaStream"]) -> str | None:
        """Collective, at close: synchronize ``streams`` even if ranks submitted different numbers of
        jobs. Ranks are released count by count, lowest first: before the ranks with ``c`` jobs
        synchronize, they overwrite the words of every writer with fewer jobs (finished by then, so
        nothing overwrites them again) with ``E(c - 1)``, which every wait of their jobs accepts.
        Returns None, or a description of the mismatch."""
        counts = [int(c) for c in self.comm.all_gather_object(int(jobs))] if self.comm is not None else [int(jobs)]
        levels = sorted(set(counts))
        if len(levels) == 1:
            for s in streams:
                s.synchronize()
            return None
        for c in levels:
            self.comm.barrier()
            if counts[self.rank] != c:
                continue
            behind = [w for w in range(self.group_size) if counts[w] < c]
            words = [self.word(k, w, l) for k in range(self.num_keys) for w in behind for l in range(self.num_lanes)]
            side = CudaStream()
            try:
                if words and c > 0:
                    self._write_local(words, self.value(c - 1, self.end), side)
                side.synchronize()
            finally:
                side.close()
            for s in streams:
                s.synchronize()
        self.comm.barrier()
        return (f"sync={self.mode!r} copy engine: ranks submitted different numbers of jobs {counts}; every rank "
                "must submit the same sequence of jobs (an empty plan where it has nothing to copy). The waiting "
                "copy streams were released at close; their copies ran without time division")

    def close(self) -> None:
        """Collective: free the words (the symmetric allocation's own close)."""
        if self.closed:
            return
        self.closed = True
        if self.owner is not None:
            self.owner.close()


def create_sync_flags(comm, device: int, *, sync: str, streams: int, distribute: str,
                      alloc: Callable[[int], Any], remote_signal: Callable | None = None,
                      timeout_s: float = 60.0) -> SyncFlags:
    """Collective: allocate, zero and test the flag words of a ``sync`` copy engine.

    Steps: every rank checks ``cuStreamBatchMemOp`` and 64-bit support and all agree on the options
    and the width; ``alloc(nbytes)`` (a backend's symmetric allocation, collective) returns an object
    with ``local.ptr``, ``peer_ptrs`` (None where unmapped), optionally ``sym_ptr``, and a collective
    ``close()``; every rank zeroes its words, all agree, then the handshake (:meth:`SyncFlags.handshake`)
    runs and all agree again.

    Raises
    ------
    CollectiveMismatchError
        Ranks asked for different ``sync`` / ``streams`` / ``distribute``.
    InvalidArgumentError
        Stream memory operations are unavailable or the handshake failed on some rank (every rank
        raises, naming the option and each rank's reason).
    """
    what = f"copy engine option sync={sync!r}"
    hint = "use sync='none' (no time division on the copy plane)"
    err, bits = None, None
    try:
        if DriverCopyCalls.get().memops is None:
            err = "the driver has no cuStreamBatchMemOp at the CUDA 12 ABI"
        else:
            bits = stream_memop_bits(device)
    except Exception as exc:
        err = f"querying stream memory operations: {type(exc).__name__}: {exc}"
    mine = (sync, int(streams), distribute)
    everyone = comm.all_gather_object((mine, err, bits))
    if len({o for o, _, _ in everyone}) > 1:
        raise CollectiveMismatchError(f"{what}: ranks created copy engines with different (sync, streams, "
                                      f"distribute): {[o for o, _, _ in everyone]}; a sync engine is collective")
    raise_gathered([e for _, e, _ in everyone], f"{what}: stream memory operations", InvalidArgumentError, hint)
    bits = min(b for _, _, b in everyone)
    heap = alloc(SyncFlags.WORD * SyncFlags.num_words(sync, comm.size, int(streams)))
    try:
        flags, err = None, None
        try:
            flags = SyncFlags(mode=sync, rank=comm.rank, group_size=comm.size, num_lanes=int(streams),
                              distribute=distribute, bits=bits, local_ptr=heap.local.ptr, peer_ptrs=heap.peer_ptrs,
                              sym_ptr=getattr(heap, "sym_ptr", None), remote_signal=remote_signal, comm=comm,
                              owner=heap)
            flags.zero()
        except Exception as exc:
            err = f"setting up the flags: {type(exc).__name__}: {exc}"
        agree(comm, err, f"{what}: setting up the flags", InvalidArgumentError, hint)  # nobody writes before this
        agree(comm, flags.handshake(timeout_s), f"{what}: the flag handshake", InvalidArgumentError, hint)
    except BaseException:
        heap.close()  # collective: every rank raised the same agreed error
        raise
    log.info("dwdp_comm: rank %d copy engine sync=%r: %d-bit flags, %d bytes of symmetric memory", comm.rank, sync,
             bits, flags.nbytes)
    return flags


class SyncStep:
    """One (slot, lane) of a :class:`SyncProgram`: waits, then copies, then writes, on one lane.

    Attributes
    ----------
    slot, lane : int
    copies : numpy.ndarray
        Indices into the job's remote copies (plan order); in :attr:`SyncProgram.perm` they are the
        contiguous range ``[start, stop)``.
    waits, writes : (int, int)
        Op ranges ``[a, b)`` of :attr:`SyncProgram.ops`: waits enqueued before the copies, writes after.
    signals : list of (sym_addr, rel, pe)
        Writes to ranks whose flags are not mapped here (NVSHMEM signals), after the copies.
    """

    __slots__ = ("slot", "lane", "copies", "waits", "writes", "signals", "start", "stop")

    def __init__(self, slot, lane, copies, waits, writes, signals, start, stop):
        self.slot, self.lane, self.copies, self.waits, self.writes = slot, lane, copies, waits, writes
        self.signals, self.start, self.stop = signals, start, stop


class SyncProgram:
    """The flag operations of one plan on one sync engine, built once, values filled per job.

    Attributes
    ----------
    ops : numpy.ndarray
        Every wait and write of a job (:data:`MEMOP_DTYPE`), grouped by call; ``rel`` (int64) is
        each one's value before the job is folded in (``k + 1`` for slot ``k``, or ``flags.end``).
    init : list of (lane, (a, b), signals)
        Writes that go first on each lane (slots the lane has no copies in), ops ``[a, b)``.
    steps : list of SyncStep
        Slot-major order (slot, then lane).
    perm : numpy.ndarray
        The job's remote copies in step order (step ``i`` is ``perm[steps[i].start:steps[i].stop]``).
    """

    def __init__(self, ops: np.ndarray, rel: np.ndarray, init: list, steps: list):
        self.ops, self.rel, self.init, self.steps = ops, rel, init, steps
        self.perm = (np.concatenate([st.copies for st in steps]) if steps else np.zeros(0, dtype=np.int64))

    def fill(self, flags: SyncFlags, job: int) -> None:
        """Put job ``job``'s values into :attr:`ops`."""
        vals = self.rel.astype(np.uint64)
        vals += np.uint64((job * flags.span) & flags.mask)
        vals &= np.uint64(flags.mask)
        self.ops["value"] = vals


def build_sync_program(flags: SyncFlags, slot: np.ndarray, src: np.ndarray, lane: np.ndarray) -> SyncProgram:
    """The flag operations of the remote copies ``(slot, src, lane)`` (plan order) of this rank.

    Lane ``l`` keeps each key ``K`` it maintains up to date: before its first copy of ``K`` it
    writes ``V(k0 - 1)`` (``k0`` its first slot with ``K``; ``E`` if it has none); after its copies
    of slot ``k`` it writes ``V(k' - 1)`` for its next slot ``k'`` with ``K`` (``E`` if none). Before
    the copies of slot ``k > 0`` with key ``K`` it waits for ``V(k - 1)`` on every lane of every rank
    that may carry ``K`` (its own word excepted: stream order covers it).
    """
    f, G, me = flags, flags.group_size, flags.rank
    keys = np.zeros_like(slot) if f.mode == "slot" else src
    ops: list[tuple[int, int, int, int]] = []  # (operation, address, flags, rel)
    W = f.WORD

    def write(key: int, ln: int, rel: int, signals: list) -> None:
        w = f.word(key, me, ln)
        for t in f.targets(key):
            if f.peer_ptrs[t] is None:
                signals.append((f.sym_ptr + W * w, rel, t))
            else:
                ops.append((f.write_op, f.peer_ptrs[t] + W * w, WRITE_VALUE_DEFAULT, rel))

    init, per_lane = [], []
    for ln in range(f.num_lanes):
        mine = np.flatnonzero(lane == ln)
        kslots = {K: np.unique(slot[mine][keys[mine] == K]).tolist() for K in f.maintained(ln)}
        a, signals = len(ops), []
        for K, ks in kslots.items():
            if not ks:
                write(K, ln, f.end, signals)
            elif ks[0] > 0:
                write(K, ln, ks[0], signals)
        if len(ops) > a or signals:
            init.append((ln, (a, len(ops)), signals))
        per_lane.append((mine, kslots))
    steps = []
    order = np.lexsort((lane, slot))  # slot-major, then lane; plan order within (slot, lane)
    bounds = np.flatnonzero(np.diff(slot[order]) | np.diff(lane[order])) + 1
    for group in np.split(order, bounds) if order.size else []:
        k, ln = int(slot[group[0]]), int(lane[group[0]])
        group = np.sort(group)  # plan order
        kslots = per_lane[ln][1]
        gkeys = list(dict.fromkeys(keys[group].tolist()))
        a = len(ops)
        if k > 0:
            for K in gkeys:
                for w in range(G):
                    if f.mode == "source" and w == K:
                        continue
                    for l2 in f.lanes_for(K, w):
                        if w == me and l2 == ln:
                            continue
                        ops.append((f.wait_op, f.local_ptr + W * f.word(K, w, l2), WAIT_VALUE_GEQ, k))
        b = len(ops)
        signals: list = []
        for K in gkeys:
            ks = kslots[K]
            i = ks.index(k)
            write(K, ln, ks[i + 1] if i + 1 < len(ks) else f.end, signals)
        pos = steps[-1].stop if steps else 0
        steps.append(SyncStep(k, ln, group, (a, b), (b, len(ops)), signals, pos, pos + len(group)))
    arr = np.zeros(len(ops), dtype=MEMOP_DTYPE)
    rel = np.zeros(len(ops), dtype=np.int64)
    if ops:
        o = np.array(ops, dtype=np.uint64)
        arr["operation"], arr["address"], arr["flags"] = o[:, 0], o[:, 1], o[:, 2]
        rel[:] = o[:, 3].astype(np.int64)
    return SyncProgram(arr, rel, init, steps)


class CopyExecutor(CopyEngine):
    """Runs copy plans on dedicated non-blocking copy streams with raw CUDA copies.

    Copy ``i`` of a plan reads ``src_ptrs[src_rank[i]] + src_base + src_offset[i]`` (a peer's heap
    as mapped into this process) and writes ``dst.ptr + dst_base + dst_offset[i]``. Nothing goes
    through torch (whose cross-device ``copy_`` adds cross-device stream syncs) and nothing blocks
    the host: a job makes its copy streams wait for its ``after`` events, issues the copies, and
    records one done event, which joins every stream the job used. Compute streams only ever wait
    on done events.

    **Lanes.** Copies from peers run on ``streams`` lanes: with ``distribute="source"``,
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
        return self.num_streams

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
        if self.distribute == "source":
            lanes = ((src_rank - self.rank - 1) % self.group_size) % self.num_streams
        else:
            lanes = slots % self.num_streams
        lanes = np.where(src_rank == self.rank, self.local_lane, lanes)
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
                check(rt.cudaStreamWaitEvent(self._streams[lane].raw, ev._ev, 0), "cudaStreamWaitEvent",
                      f"copy stream {lane} waiting for an 'after' event")

    def _join(self, lanes: Sequence[int], capture: int | None = None) -> CudaEvent:
        """Record the done event on the first of ``lanes`` after it waited for the others."""
        rt, _ = load()
        join = self._streams[lanes[0]]
        for lane in lanes[1:]:
            ev = CudaEvent().record(self._streams[lane].handle, capture)
            check(rt.cudaStreamWaitEvent(join.raw, ev._ev, 0), "cudaStreamWaitEvent", "joining copy streams")
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
        memops, ops_ptr, W = self._drv.memops, int(prog.ops.ctypes.data), MEMOP_DTYPE.itemsize
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
            a, b = st.waits
            for o in range(a, b, MEMOP_MAX):
                err = memops(h, min(MEMOP_MAX, b - o), ops_ptr + W * o, 0)
                if err:
                    raise self._drv.error(err, "cuStreamBatchMemOp", f"lane {st.lane}: flag waits before slot {st.slot}")
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
            a, b = st.writes
            for o in range(a, b, MEMOP_MAX):
                err = memops(h, min(MEMOP_MAX, b - o), ops_ptr + W * o, 0)
                if err:
                    raise self._drv.error(err, "cuStreamBatchMemOp", f"lane {st.lane}: flag writes after slot {st.slot}")
            if st.signals:
                self._signal(stream, st.signals, job)

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
    def collective(self) -> bool:
        """True with ``sync``: creation and ``close`` are collective."""
        return self._flags is not None

    def abort(self) -> None:
        """Release without waiting and without any collective step: copy streams are destroyed (CUDA
        frees them once their work is done; a ``sync`` stream waiting for a peer that never comes
        is leaked, not waited for) and the flag words released locally. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for _, execs in self._graphs.values():
                self._destroy_graphs(execs)
            self._graphs.clear()
            self._programs.clear()
            for s in self._streams:
                s.close()
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
        finally:
            try:
                for _, execs in self._graphs.values():
                    self._destroy_graphs(execs)
                self._graphs.clear()
                self._programs.clear()
                for s in self._streams:
                    s.close()
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

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self.name} backend used after close()")

    def record_event(self, stream: Any = None) -> CudaEvent:
        """A CUDA event recorded now on ``stream`` (None: the current torch stream). Non-blocking.
        Its ``capture`` says which CUDA graph capture, if any, it was recorded in."""
        capture = self.capture_id(stream)  # before resolving: None takes the fast path
        return CudaEvent().record(resolve_stream(stream), capture)

    def capture_id(self, stream: Any = None) -> int | None:
        """The id of the CUDA graph capture ``stream`` (None: the current torch stream) is part of,
        or None. Never blocks; a capture invalidated by an earlier error raises
        :class:`~dwdp_comm.errors.GraphCaptureError`."""
        if stream is None and torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():
            return None  # the common eager case without a cuda.bindings call
        return stream_capture_id(resolve_stream(stream))

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
        if self._closed:
            raise ClosedError("backend closed twice")
        self._closed = True
        self._leak_report()
