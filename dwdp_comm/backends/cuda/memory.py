"""Device memory owned by small allocation objects, and buffers over it.

:class:`MallocAlloc`, :class:`~.vmm.VmmAlloc` and :class:`ForeignAlloc` own device memory. Buffers
and every tensor view hold a reference; the memory is freed when the last of them goes, so closing
a buffer never unmaps memory under a live tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ClosedError, bad_arg
from ...interop.torch import tensor_from_ptr
from ..base import Buffer
from .driver import check, load, log

__all__ = ["Alloc", "MallocAlloc", "ForeignAlloc", "DeviceBuffer"]


# ---- device memory --------------------------------------------------------------------------------
class Alloc:
    """Device memory, freed when the last reference (buffer or tensor view) goes.

    Subclasses implement :meth:`release` (free the memory once); callers call :meth:`free`.
    """

    kind = "device memory"
    freed = True  # until __init__ completes: a half-built object frees nothing

    def __init__(self, ptr: int, nbytes: int, device: int):
        self.ptr, self.nbytes, self.device = int(ptr), int(nbytes), int(device)
        self.freed = False

    def free(self) -> None:
        if not self.freed:
            self.freed = True
            self.release()

    def release(self) -> None:
        """Free the memory (called once, by :meth:`free`)."""
        raise NotImplementedError

    def __del__(self):
        try:
            self.free()
        except Exception as exc:  # at interpreter exit CUDA may already be gone
            log.debug("dwdp_comm: freeing %s failed: %r", self.kind, exc)


class MallocAlloc(Alloc):
    """``cudaMalloc`` memory (exportable with legacy ``cudaIpcGetMemHandle``)."""

    kind = "cudaMalloc memory"

    def __init__(self, nbytes: int, device: int):
        rt, _ = load()
        ptr = check(rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc", f"{nbytes} bytes on GPU {device}")
        super().__init__(int(ptr), nbytes, device)

    def release(self) -> None:
        rt, _ = load()
        check(rt.cudaFree(self.ptr), "cudaFree")  # cudaFree waits for work in flight


class ForeignAlloc(Alloc):
    """Memory another library owns (NVSHMEM); ``keepalive`` is referenced until freed by its owner."""

    kind = "foreign device memory"

    def __init__(self, ptr: int, nbytes: int, device: int, keepalive: Any = None):
        super().__init__(ptr, nbytes, device)
        self.keepalive = keepalive

    def release(self) -> None:
        self.keepalive = None


class DeviceBuffer(Buffer):
    """A region of device memory with zero-copy ``uint8`` torch views.

    Attributes
    ----------
    nbytes : int
        Usable bytes (the allocation may be rounded up to the VMM granularity).
    ptr : int
        Device address of byte 0 (raises :class:`ClosedError` after ``close``).

    Parameters
    ----------
    alloc : Alloc
    nbytes : int, optional
        Usable bytes (default: the whole allocation).
    tracker : CudaBackendBase, optional
        The backend whose leak report at close counts ``alloc`` (its ``track(alloc)``).
    """

    def __init__(self, alloc: Alloc, nbytes: int | None = None, tracker: Any = None):
        self._alloc: Alloc | None = alloc
        self.nbytes = alloc.nbytes if nbytes is None else int(nbytes)
        self.device = alloc.device
        if tracker is not None:
            tracker.track(alloc)

    @property
    def alloc(self) -> Alloc:
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
