"""VMM (``cuMem*``) memory: exportable segmented allocations and composite views that map pieces
of several allocations into one range without moving bytes."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...checks import align_up
from ...errors import ClosedError, DwdpError, bad_arg
from ...interop.torch import tensor_from_ptr
from ..base import Composite
from .driver import bindings, check, load, log
from .memory import Alloc, DeviceBuffer

__all__ = ["vmm_granularity", "vmm_set_access", "vmm_reserve", "segment_sizes", "VmmAlloc", "CudaComposite"]


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
    total = max(align_up(int(nbytes), granularity), granularity)
    cuts = sorted({int(b) for b in boundaries if 0 < int(b) < total})
    for b in cuts:
        if b % granularity:
            raise bad_arg("boundaries", b, f"offsets that are multiples of the VMM granularity {granularity}")
    edges = [0, *cuts, total]
    return [b - a for a, b in zip(edges, edges[1:])]


class VmmAlloc(Alloc):
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

    def release(self) -> None:
        rt, dr = load()
        # Unmapping is not stream-ordered: let work that may still touch the range finish first.
        rt.cudaDeviceSynchronize()
        for off, n, _ in self.segments:
            check(dr.cuMemUnmap(self.ptr + off, n), "cuMemUnmap")
        check(dr.cuMemAddressFree(self.ptr, self.nbytes), "cuMemAddressFree")
        for _, _, h in self.segments:  # physical memory goes with its last mapping
            check(dr.cuMemRelease(h), "cuMemRelease")


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
            if self._maps and bindings.rt is not None:
                bindings.rt.cudaDeviceSynchronize()  # not stream-ordered: let readers finish
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
