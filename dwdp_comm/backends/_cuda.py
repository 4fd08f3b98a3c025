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
import weakref
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import BackendUnavailableError, ClosedError, DwdpError, PeerAccessError, bad_arg, bad_type
from ..interop import MissingDependencyError
from ..interop.streams import resolve_stream
from ..interop.torch import tensor_from_ptr
from ..planner import CopyPlan
from .base import Backend, Buffer, Composite, CopyEngine, Event

__all__ = ["load", "check", "CudaError", "CudaEvent", "CudaStream", "DeviceBuffer", "MallocAlloc", "VmmAlloc",
           "ForeignAlloc", "CudaComposite", "CopyExecutor", "CudaBackendBase", "parse_engine_options",
           "peer_access_problems", "pidfd_getfd", "bindings_reason", "agree", "raise_gathered"]

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

    def __init__(self, api: str, err: Any, context: str = ""):
        self.api = api
        self.code = int(err)
        self.name = getattr(err, "name", None) or str(err)
        msg = f"{api} failed: {self.name} ({self.code})"
        super().__init__(msg + (f": {context}" if context else ""))


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


# ---- events and streams ---------------------------------------------------------------------------
class CudaEvent(Event):
    """A CUDA event (``cudaEventDisableTiming``). ``wait`` never blocks the host.

    Attributes
    ----------
    handle : int
        The raw ``cudaEvent_t``, for use with other libraries.
    """

    __slots__ = ("_ev", "handle")

    def __init__(self):
        rt, _ = load()
        self._ev = check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")
        self.handle = int(self._ev)

    def record(self, stream: int) -> "CudaEvent":
        rt, _ = load()
        check(rt.cudaEventRecord(self._ev, stream), "cudaEventRecord", f"on stream 0x{stream:x}")
        return self

    def wait(self, stream: Any = None) -> None:
        """Make ``stream`` (any kind :func:`~dwdp_comm.interop.streams.resolve_stream` takes;
        None: the current torch stream) wait for this event. Returns at once."""
        rt, _ = load()
        s = resolve_stream(stream)
        check(rt.cudaStreamWaitEvent(s, self._ev, 0), "cudaStreamWaitEvent", f"stream 0x{s:x}")

    def synchronize(self) -> None:
        """Block the host until the event completed; a failed copy raises :class:`CudaError`."""
        rt, _ = load()
        check(rt.cudaEventSynchronize(self._ev), "cudaEventSynchronize",
              "a copy or kernel before this event failed")

    @property
    def is_done(self) -> bool:
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
    (every rank holds the same list, so every rank raises the same error)."""
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        lines = "\n".join(f"  rank {r}: {e}" for r, e in bad)
        raise exc_type(f"{what} failed on {len(bad)} of {len(errors)} ranks:\n{lines}" + (f"\n{hint}" if hint else ""))


def agree(comm, error: str | None, what: str, exc_type=BackendUnavailableError, hint: str = "") -> None:
    """Collective: raise ``exc_type`` on every rank, listing every rank's error, if any rank has one."""
    raise_gathered(comm.all_gather_object(error), what, exc_type, hint)


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
ENGINE_OPTIONS = ("streams", "api", "distribute", "overlap_hint")


def parse_engine_options(options: dict, backend: str) -> dict:
    """Validate copy-engine options; unknown ones raise ``InvalidArgumentError`` naming them.

    ``streams`` (int >= 1, default 1), ``api`` ("batch" default, or "memcpy"), ``distribute``
    ("source" default, or "slot"), ``overlap_hint`` (bool, default False).
    """
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        raise bad_arg("copy engine options", unknown, f"a subset of {list(ENGINE_OPTIONS)} on the {backend} backend")
    streams = options.get("streams", 1)
    if isinstance(streams, bool) or not isinstance(streams, (int, np.integer)):
        raise bad_type("streams", streams, "an int")
    if streams < 1:
        raise bad_arg("streams", streams, "an int >= 1")
    api = options.get("api", "batch")  # measured best on H200 (perf/results/gpu_copy_plane_h200x2.json)
    if api not in ("memcpy", "batch"):
        raise bad_arg("api", api, "'memcpy' or 'batch'")
    distribute = options.get("distribute", "source")
    if distribute not in ("source", "slot"):
        raise bad_arg("distribute", distribute, "'source' or 'slot'")
    overlap_hint = options.get("overlap_hint", False)
    if not isinstance(overlap_hint, bool):
        raise bad_type("overlap_hint", overlap_hint, "a bool")
    return {"streams": int(streams), "api": api, "distribute": distribute, "overlap_hint": overlap_hint}


class DriverCopyCalls:
    """The driver's copy entry points called through ctypes, from NumPy pointer arrays.

    cuda.bindings converts every argument of every call (about 10-20 us per copy for
    ``cudaMemcpyBatchAsync`` lists of thousands of copies, measured on H200): a layer's plan would
    hold the host, and with it the compute stream's launches, for tens of ms. Here a batch is one
    C call on three ``uint64`` arrays, and a single copy about a microsecond of Python.
    Entry points come from ``cuGetProcAddress`` at the CUDA 13 ABI (``cuMemcpyBatchAsync`` without
    ``failIdx``); ``batch`` is None where the driver predates it.
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


class CopyExecutor(CopyEngine):
    """Runs copy plans on dedicated non-blocking copy streams with raw CUDA copies.

    Copy ``i`` of a plan reads ``src_ptrs[src_rank[i]] + src_base + src_offset[i]`` (a peer's heap
    as mapped into this process) and writes ``dst.ptr + dst_base + dst_offset[i]``. Nothing goes
    through torch (whose cross-device ``copy_`` adds cross-device stream syncs) and nothing blocks
    the host: a job makes its copy streams wait for its ``after`` events, issues the copies, and
    records one done event.

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
        Copy streams. Copies go to stream ``lane`` where, with ``distribute="source"``,
        ``lane = ((src_rank - rank - 1) mod G) mod streams`` (each peer on its own stream when
        ``streams >= G - 1``; local copies share lane ``(G - 1) mod streams``) or, with
        ``distribute="slot"``, ``lane = slot mod streams``. Order within a lane is plan order;
        the job's done event joins all lanes.
    api : {"memcpy", "batch"}
        ``memcpy``: one ``cudaMemcpyAsync`` per copy. ``batch``: one ``cudaMemcpyBatchAsync`` per
        lane and job (the driver may run a batch's copies in any order: the time-division order of
        the plan becomes a hint). When the batch call is unavailable or fails a test copy, the
        executor logs why and uses ``memcpy`` (``self.api`` says which runs, ``self.api_reason`` why).
    overlap_hint : bool
        ``batch`` only: set ``cudaMemcpyFlagPreferOverlapWithCompute``.
    """

    def __init__(self, *, device: int, rank: int, group_size: int, src_ptrs: Sequence[int | None], src_nbytes: int,
                 remote_get: Callable | None = None, sym_ptr: int | None = None, streams: int = 1,
                 api: str = "batch", distribute: str = "source", overlap_hint: bool = False):
        rt, _ = load()
        self.device, self.rank, self.group_size = device, rank, group_size
        if len(src_ptrs) != group_size:
            raise bad_arg("src_ptrs", len(src_ptrs), f"{group_size} entries (one per rank)")
        if any(p is None for p in src_ptrs) and (remote_get is None or sym_ptr is None):
            raise bad_arg("remote_get", None, "a function and sym_ptr when some source has no peer mapping")
        self._base = np.array([p or 0 for p in src_ptrs], dtype=np.int64)
        self._mapped = np.array([p is not None for p in src_ptrs], dtype=bool)
        self._src_nbytes = int(src_nbytes)
        self._remote_get, self._sym = remote_get, int(sym_ptr or 0)
        self.num_streams, self.distribute = streams, distribute
        self._streams = [CudaStream() for _ in range(streams)]
        self._kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._ok = rt.cudaError_t.cudaSuccess
        self.api, self.api_reason = api, "requested"
        self._drv = DriverCopyCalls.get()
        if api == "batch":
            reason = self._probe_batch(overlap_hint)
            if reason is not None:
                log.warning("dwdp_comm: copy engine api='batch' unavailable, using 'memcpy': %s", reason)
                self.api, self.api_reason = "memcpy", reason
        self.jobs = 0
        self._closed = False

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
               after: Sequence[Event] = ()) -> CudaEvent:
        """Enqueue ``plan`` on the copy streams; return its done event at once (host never blocks).

        Raises
        ------
        InvalidArgumentError
            ``dst`` is not a buffer of this backend, an ``after`` entry is not a CUDA event, or a
            copy would leave the source heap or the destination buffer (checked before any copy).
        """
        if self._closed:
            raise ClosedError("copy engine used after close()")
        if not isinstance(dst, DeviceBuffer):
            raise bad_arg("dst", type(dst).__name__, "a DeviceBuffer of this GPU backend")
        after = tuple(after)
        for ev in after:
            if not isinstance(ev, CudaEvent):
                raise bad_arg("after", type(ev).__name__, "CUDA events of this backend")
        rt, _ = load()
        dst_ptr = dst.ptr
        keep = plan.nbytes > 0
        src_rank, src_off = plan.src_rank[keep], src_base + plan.src_offset[keep]
        dst_off, nbytes = dst_base + plan.dst_offset[keep], plan.nbytes[keep]
        if nbytes.size:
            self._check_bounds(src_rank, src_off, dst_off, nbytes, dst.nbytes)
            if self.distribute == "source":
                lanes = ((src_rank - self.rank - 1) % self.group_size) % self.num_streams
            else:
                lanes = plan.slot[keep] % self.num_streams
            used = sorted(set(lanes.tolist()))
        else:
            lanes, used = None, [0]
        for lane in used:
            for ev in after:
                check(rt.cudaStreamWaitEvent(self._streams[lane].raw, ev._ev, 0), "cudaStreamWaitEvent",
                      f"copy stream {lane} waiting for an 'after' event")
        if nbytes.size:
            src_addr = self._base[src_rank] + src_off
            dst_addr = dst_ptr + dst_off
            remote = ~self._mapped[src_rank]
            for lane in used:
                idx = np.flatnonzero(lanes == lane) if len(used) > 1 else slice(None)
                self._issue(self._streams[lane], src_addr[idx], dst_addr[idx], nbytes[idx], src_rank[idx],
                            src_off[idx], remote[idx])
        join = self._streams[used[0]]
        for lane in used[1:]:
            ev = CudaEvent().record(self._streams[lane].handle)
            check(rt.cudaStreamWaitEvent(join.raw, ev._ev, 0), "cudaStreamWaitEvent", "joining copy streams")
        self.jobs += 1
        return CudaEvent().record(join.handle)

    def _check_bounds(self, src_rank, src_off, dst_off, nbytes, dst_nbytes: int) -> None:
        src_end, dst_end = src_off + nbytes, dst_off + nbytes
        bad = np.flatnonzero((src_off < 0) | (src_end > self._src_nbytes) | (dst_off < 0) | (dst_end > dst_nbytes))
        if bad.size:
            i = int(bad[0])
            raise bad_arg("plan", f"copy {i} reading [{int(src_off[i])}, {int(src_end[i])}) of rank "
                          f"{int(src_rank[i])}'s heap into [{int(dst_off[i])}, {int(dst_end[i])}) of dst",
                          f"ranges inside the heap ({self._src_nbytes} bytes) and dst ({dst_nbytes} bytes)")

    def _issue(self, stream: CudaStream, src_addr, dst_addr, nbytes, src_rank, src_off, remote) -> None:
        rt, _ = load()
        if remote.any():
            # Sources without a peer mapping (other nodes): NVSHMEM gets, in plan order with the rest.
            for d, s, n, r, so, rem in zip(dst_addr.tolist(), src_addr.tolist(), nbytes.tolist(), src_rank.tolist(),
                                           src_off.tolist(), remote.tolist()):
                if rem:
                    self._remote_get(d, self._sym + so, n, r, stream.handle)
                else:
                    self._memcpy(stream, d, s, n, r)
            return
        if self.api == "batch":
            self._batch(stream, dst_addr, src_addr, nbytes)
            return
        memcpy, st = self._drv.memcpy, stream.handle
        if memcpy is None:  # no ctypes entry point: the slower cuda.bindings call
            for d, s, n, r in zip(dst_addr.tolist(), src_addr.tolist(), nbytes.tolist(), src_rank.tolist()):
                self._memcpy(stream, d, s, n, r)
            return
        for d, s, n, r in zip(dst_addr.tolist(), src_addr.tolist(), nbytes.tolist(), src_rank.tolist()):
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
        """Raw handles of the copy streams."""
        return [s.handle for s in self._streams]

    def close(self) -> None:
        """Wait for submitted copies, then destroy the copy streams."""
        if self._closed:
            raise ClosedError("copy engine closed twice")
        self._closed = True
        try:
            for s in self._streams:
                s.synchronize()
        finally:
            for s in self._streams:
                s.close()


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
        """A CUDA event recorded now on ``stream`` (None: the current torch stream). Non-blocking."""
        return CudaEvent().record(resolve_stream(stream))

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
