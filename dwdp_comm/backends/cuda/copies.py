"""The driver's copy and stream-memory entry points, called through ctypes on NumPy arrays."""

from __future__ import annotations

import ctypes

import numpy as np

from ...errors import DwdpError
from .driver import CudaError, check, load

__all__ = ["DriverCopyCalls", "MEMOP_DTYPE", "MEMOP_MAX", "OP_WAIT_VALUE_32", "OP_WRITE_VALUE_32", "OP_WAIT_VALUE_64",
           "OP_WRITE_VALUE_64", "WAIT_VALUE_GEQ", "WRITE_VALUE_DEFAULT", "issue_memops"]


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

    instance: "DriverCopyCalls | None" = None  # the process's one, made by get(); tests put a fake here

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
        if cls.instance is None:
            cls.instance = cls()
        return cls.instance

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
# 32. tests/cpu/test_interop_cpu.py checks this layout against cuda.bindings' own struct.
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
