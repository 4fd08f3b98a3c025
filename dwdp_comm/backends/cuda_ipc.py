"""The ``cuda_ipc`` backend: one host, one GPU per rank, peers' heaps mapped with CUDA IPC.

Two ways to share memory, chosen collectively at creation (``backend.mode`` says which, and
``backend.mode_reason`` why):

``vmm`` (preferred)
    Every heap and slot is a VMM allocation (``cuMemCreate``, granularity G = 2 MiB on Hopper).
    A heap is exported as a POSIX file descriptor (``cuMemExportToShareableHandle``); ranks
    exchange ``(pid, fd)`` over the group and each peer duplicates the fd into itself with
    ``pidfd_open`` + ``pidfd_getfd`` (Linux >= 5.6; needs ptrace permission over the peer: same
    user with ``kernel.yama.ptrace_scope = 0``, or root / CAP_SYS_PTRACE), imports it
    (``cuMemImportFromShareableHandle``), maps it into its own address space and grants its GPU
    access (``cuMemSetAccess``). ``alloc_alignment = map_granularity = G``, so the store serves every
    tensor whose ranks' expert blocks start and end on multiples of G in ``composite`` mode:
    ``weights(name)`` is one ``[num_experts, ...]`` range where the local experts are the heap
    pages themselves (zero copy) and the remote ones the prefetch slot's pages, mapped back to back with ``cuMemMap`` at
    again (the layout TensorRT-LLM PR 14453 moved to). The 580 driver refuses ``cuMemMap`` at a
    non-zero offset into an allocation, so heaps and slots are cut into one physical allocation per
    segment at the boundaries the store gives, and composites map whole segments.
    Other tensors use ``gather`` mode (see :mod:`dwdp_comm.store`).

``legacy``
    ``cudaMalloc`` memory shared with ``cudaIpcGetMemHandle`` / ``cudaIpcOpenMemHandle``
    (``cudaIpcMemLazyEnablePeerAccess``). No composites: ``map_granularity = None``, every tensor
    uses ``gather`` mode (the slot holds all experts and the plan copies the local ones in too, a
    local copy that never crosses the fabric). Used with ``vmm=False``, or when the VMM handshake
    fails on any rank (no VMM / POSIX-fd support, pidfd_getfd refused, import or offset mapping
    refused by the driver); the reason is logged.

The VMM handshake at creation allocates two one-granule segments on each rank, exports them, and
makes every rank import every peer's, map them, and read a marker byte through them; it also maps
a rank's own second segment a second time, alone (what composites do). All ranks then agree on the
mode, so the heap layout stays symmetric.

Errors are raised on every rank: ranks on several hosts (:class:`BackendUnavailableError`), two
GPUs without peer access (:class:`PeerAccessError` naming the pair), a handle that cannot be opened
(:class:`PeerAccessError` naming importer and owner). Each suggests ``nvshmem`` or ``sim``.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any, Sequence

from ..comm import describe
from ..errors import BackendUnavailableError, DwdpError, PeerAccessError, bad_arg, bad_type
from ..engine_options import parse_engine_options
from .cuda.backend import CudaBackendBase, cuda_probe
from .cuda.driver import check, load
from .cuda.executor import CopyExecutor
from .cuda.fd_passing import pidfd_getfd
from .cuda.memory import Alloc, DeviceBuffer, MallocAlloc
from .cuda.peers import agree, check_peer_access, device_info, raise_gathered
from .cuda.sync_flags import create_sync_flags
from .cuda.time_division import TimeDivisionExecutor
from .cuda.vmm import CudaComposite, VmmAlloc, vmm_granularity, vmm_reserve, vmm_set_access
from .base import Buffer, SymmetricHeap

__all__ = ["CudaIpcBackend", "probe"]

log = logging.getLogger("dwdp_comm")

_LEAKED_ON_ABORT: list = []  # legacy-IPC heaps given up by abort(): freed at process exit
_ALTERNATIVES = "backend='nvshmem' (NVSHMEM reaches peers through its own transports) or backend='sim' (CPU)"


class _IpcImport(Alloc):
    """A peer's ``cudaMalloc`` memory opened with ``cudaIpcOpenMemHandle``."""

    kind = "imported IPC memory"

    def __init__(self, handle_bytes: bytes, nbytes: int, device: int):
        rt, _ = load()
        h = rt.cudaIpcMemHandle_t()
        ctypes.memmove(h.getPtr(), handle_bytes, len(handle_bytes))
        ptr = check(rt.cudaIpcOpenMemHandle(h, rt.cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle")
        super().__init__(int(ptr), nbytes, device)

    def release(self) -> None:
        rt, _ = load()
        check(rt.cudaIpcCloseMemHandle(self.ptr), "cudaIpcCloseMemHandle")


def _ipc_handle_bytes(ptr: int) -> bytes:
    rt, _ = load()
    h = check(rt.cudaIpcGetMemHandle(ptr), "cudaIpcGetMemHandle")
    return ctypes.string_at(h.getPtr(), 64)  # CUDA_IPC_HANDLE_SIZE


class CudaIpcHeap(SymmetricHeap):
    """This rank's heap plus every peer's, mapped into this process. Collective to create and close.

    Attributes
    ----------
    nbytes : int
    local : DeviceBuffer
        This rank's part.
    peer_ptrs : list of int
        Address of each rank's heap in this process (this rank's own at its index).
    """

    def __init__(self, backend: "CudaIpcBackend", nbytes: int, boundaries: Sequence[int] = ()):
        comm, dev = backend.comm, backend.device_index
        self.nbytes, self._comm, self._backend = int(nbytes), comm, backend
        self._vmm = backend.mode == "vmm"
        alloc, fds, payload, err = None, [], None, None
        try:
            if self._vmm:
                # One physical allocation per segment, so composites can map local blocks whole.
                alloc = VmmAlloc.create(self.nbytes, dev, backend.granularity, exportable=True,
                                        boundaries=boundaries if backend.map_granularity else ())
                fds = alloc.export_fds()
                payload = ("vmm", os.getpid(), fds, alloc.segment_sizes)
            else:
                alloc = MallocAlloc(self.nbytes, dev)
                payload = ("ipc", _ipc_handle_bytes(alloc.ptr), alloc.nbytes)
        except Exception as exc:
            err = f"allocating {self.nbytes} bytes on GPU {dev}: {describe(exc)}"
        everyone = comm.all_gather_object((err, payload))
        try:
            raise_gathered([e for e, _ in everyone], "cuda_ipc: allocating the symmetric heap")
            self._peers: list[Alloc | None] = [None] * comm.size
            problems = []
            for r, (_, p) in enumerate(everyone):
                if r == comm.rank:
                    continue
                try:
                    if backend.fail_open == (comm.rank, r):
                        raise DwdpError("injected failure (fail_open option, for tests)")
                    self._peers[r] = self._open(p, dev, backend)
                except Exception as exc:
                    problems.append(f"rank {comm.rank} (GPU {dev}) could not open the heap of rank {r} "
                                    f"(GPU {backend.infos[r]['device']}, {backend.infos[r]['pci']}): {describe(exc)}")
            # Also the point after which every peer holds its own reference: exported fds can go.
            agree(comm, "; ".join(problems) or None, "cuda_ipc: opening peers' heaps", PeerAccessError,
                  f"try backend option vmm=False (legacy CUDA IPC) if the VMM import failed, or {_ALTERNATIVES}")
        finally:
            for fd in fds:
                os.close(fd)
        self.local = DeviceBuffer(alloc, self.nbytes, tracker=backend)
        for p in self._peers:
            if p is not None:
                backend.track(p)
        self.peer_ptrs = [alloc.ptr if r == comm.rank else self._peers[r].ptr for r in range(comm.size)]
        self._closed = False

    @staticmethod
    def _open(payload, dev: int, backend: "CudaIpcBackend") -> Alloc:
        if payload[0] == "vmm":
            _, pid, fds, sizes = payload
            local_fds = []
            try:
                for fd in fds:
                    local_fds.append(pidfd_getfd(pid, fd))
                return VmmAlloc.import_fds(local_fds, sizes, dev, backend.granularity)
            finally:
                for fd in local_fds:
                    os.close(fd)  # the imported handles hold their own references
        _, handle, size = payload
        return _IpcImport(handle, size, dev)

    def close(self) -> None:
        """Collective: wait until no rank reads this heap, unmap the peers' heaps, free this rank's.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._comm.barrier("cuda_ipc: closing the heap")  # every rank finished its copies
        for p in self._peers:
            if p is not None:
                p.free()
        if not self._vmm:
            # cudaFree while a peer still has the memory open is undefined: wait for every close.
            self._comm.barrier("cuda_ipc: closing the heap (legacy IPC)")
        self.local.close()

    def abort(self) -> None:
        """Local release (no collective): peers' heaps unmapped here; this rank's memory is released
        in VMM mode (peers' imported handles keep it alive for them) and, in legacy mode, kept until
        the process exits (``cudaFree`` while a peer has it open is undefined). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for p in self._peers:
            if p is not None:
                try:
                    p.free()
                except Exception as exc:
                    log.warning("dwdp_comm: unmapping a peer's heap during abort failed: %r", exc)
        if self._vmm:
            self.local.close()
        else:
            _LEAKED_ON_ABORT.append(self.local)


class CudaIpcBackend(CudaBackendBase):
    """CUDA IPC heap backend (one host). Collective to create.

    Parameters
    ----------
    comm : dwdp_comm.comm.Comm
    vmm : bool or None
        None (default): VMM when every rank passes the handshake, else legacy IPC (logged).
        True: VMM or an error. False: legacy IPC.
    fail_open : (int, int), optional
        Testing only: rank ``fail_open[0]`` fails to open the heap of rank ``fail_open[1]``.

    Attributes
    ----------
    mode : {"vmm", "legacy"}
    mode_reason : str
    granularity : int or None
        VMM allocation granularity (None in legacy mode).
    infos : list of dict
        Every rank's host, pid, device ordinal, PCI bus id and GPU name.
    """

    name = "cuda_ipc"

    def __init__(self, comm, *, vmm: bool | None = None, fail_open: tuple[int, int] | None = None):
        if vmm is not None and not isinstance(vmm, bool):
            raise bad_type("vmm", vmm, "None, True or False")
        if fail_open is not None and (not isinstance(fail_open, (tuple, list)) or len(fail_open) != 2):
            raise bad_arg("fail_open", fail_open, "None or a pair (importer rank, owner rank)")
        self.fail_open = tuple(fail_open) if fail_open is not None else None
        err, info = None, None
        try:
            super().__init__(comm)
            info = device_info(self.device_index)
        except Exception as exc:
            err = describe(exc)
        everyone = comm.all_gather_object((err, info))
        raise_gathered([e for e, _ in everyone], "cuda_ipc: setting up the GPU", hint=f"use {_ALTERNATIVES}")
        self.infos = [i for _, i in everyone]
        hosts = sorted({i["host"] for i in self.infos})
        if len(hosts) > 1:
            raise BackendUnavailableError(f"backend 'cuda_ipc' works within one host, but the group spans hosts "
                                          f"{hosts}; use backend='nvshmem' across hosts")
        check_peer_access(comm, self.infos, "cuda_ipc", _ALTERNATIVES)
        self.granularity = None
        self.mode, self.mode_reason = self._choose_mode(vmm)
        if self.mode == "vmm":
            self.alloc_alignment = self.granularity
        log.info("dwdp_comm: cuda_ipc rank %d uses %s sharing (%s); map_granularity=%s", comm.rank, self.mode,
                 self.mode_reason, self.map_granularity)

    # ---- the VMM handshake ------------------------------------------------------------------------
    def _choose_mode(self, vmm: bool | None) -> tuple[str, str]:
        comm = self.comm
        if vmm is False:
            return "legacy", "vmm=False requested"
        test, fd, gran, err = None, None, None, None
        imports: list[VmmAlloc] = []
        try:
            gran, test = self._vmm_local_test()
            fd = test.export_fds()
        except Exception as exc:
            err = describe(exc)
        try:
            everyone = comm.all_gather_object({"err": err, "pid": os.getpid(), "fd": fd, "gran": gran})
            failed = {r: e["err"] for r, e in enumerate(everyone) if e["err"]}
            grans = {e["gran"] for e in everyone}
            if not failed and len(grans) > 1:
                failed = {0: f"granularities differ between ranks: {sorted(grans)}"}
            import_err = offset_err = None
            if not failed:
                import_err = self._import_test(everyone, imports, gran)
                offset_err = self._offset_test(test, gran)
            # Gathering after the imports also tells exporters that their fds may be closed.
            res = comm.all_gather_object((import_err, offset_err))
        finally:
            for f in fd or ():
                os.close(f)
        for a in imports + ([test] if test is not None else []):
            try:
                a.free()
            except Exception as exc:  # never leave a rank behind in the collective steps that follow
                log.warning("dwdp_comm: freeing a VMM handshake allocation failed: %r", exc)
        if not failed:
            failed = {r: ie for r, (ie, _) in enumerate(res) if ie}
        if failed:
            why = "; ".join(f"rank {r}: {e}" for r, e in sorted(failed.items()))
            if vmm:
                raise BackendUnavailableError(f"cuda_ipc: vmm=True but VMM sharing failed ({why}); use vmm=False "
                                              f"(legacy CUDA IPC) or {_ALTERNATIVES}")
            log.warning("dwdp_comm: cuda_ipc falls back to legacy CUDA IPC (no composite views): %s", why)
            return "legacy", f"VMM handshake failed: {why}"
        self.granularity = gran
        offset_failed = {r: oe for r, (_, oe) in enumerate(res) if oe}
        if offset_failed:
            why = "; ".join(f"rank {r}: {e}" for r, e in sorted(offset_failed.items()))
            log.warning("dwdp_comm: cuda_ipc uses VMM without composite views (every tensor in gather mode): "
                        "mapping an allocation a second time failed: %s", why)
            return "vmm", f"VMM (POSIX fd + pidfd_getfd), no composites: {why}"
        self.map_granularity = gran
        return "vmm", "VMM (POSIX fd + pidfd_getfd), composite views"

    def _vmm_local_test(self) -> tuple[int, VmmAlloc]:
        """Allocate 2 G with a POSIX-fd handle; byte 0 of granule k holds marker(rank, k)."""
        rt, dr = load()
        dev = self.device_index
        attr = dr.CUdevice_attribute
        for a in ("CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
                  "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED"):
            cu_dev = check(dr.cuDeviceGet(dev), "cuDeviceGet")
            if not check(dr.cuDeviceGetAttribute(getattr(attr, a), cu_dev), "cuDeviceGetAttribute", a):
                raise DwdpError(f"GPU {dev} does not support {a.removeprefix('CU_DEVICE_ATTRIBUTE_')}")
        gran = vmm_granularity(dev)
        test = VmmAlloc.create(2 * gran, dev, gran, exportable=True, boundaries=[gran])  # two segments
        for k in range(2):
            check(rt.cudaMemset(test.ptr + k * gran, _marker(self.comm.rank, k), gran), "cudaMemset")
        check(rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        return gran, test

    def _import_test(self, everyone: list[dict], imports: list, gran: int) -> str | None:
        problems = []
        for r, e in enumerate(everyone):
            if r == self.comm.rank:
                continue
            try:
                local_fds = []
                try:
                    for f in e["fd"]:
                        local_fds.append(pidfd_getfd(e["pid"], f))
                    a = VmmAlloc.import_fds(local_fds, [gran, gran], self.device_index, gran)
                finally:
                    for f in local_fds:
                        os.close(f)
                imports.append(a)
                got = _read_byte(a.ptr + gran)
                if got != _marker(r, 1):
                    raise DwdpError(f"read {got} through the mapping, expected {_marker(r, 1)}")
            except Exception as exc:
                problems.append(f"importing rank {r}'s memory: {describe(exc)}")
        return "; ".join(problems) or None

    def _offset_test(self, test: VmmAlloc, gran: int) -> str | None:
        """Map our second segment a second time, alone, as composites do, and read it."""
        _, dr = load()
        va = 0
        try:
            va = vmm_reserve(gran, gran)
            check(dr.cuMemMap(va, gran, 0, test.segments[1][2], 0), "cuMemMap", "a segment mapped a second time")
            try:
                vmm_set_access(va, gran, self.device_index)
                got = _read_byte(va)
                if got != _marker(self.comm.rank, 1):
                    raise DwdpError(f"read {got} through the second mapping, expected {_marker(self.comm.rank, 1)}")
            finally:
                dr.cuMemUnmap(va, gran)
        except Exception as exc:
            return describe(exc)
        finally:
            if va:
                dr.cuMemAddressFree(va, gran)
        return None

    # ---- Backend interface --------------------------------------------------------------------------
    def alloc_symmetric(self, nbytes: int, boundaries: Sequence[int] = ()) -> CudaIpcHeap:
        """Collective: ``nbytes`` of device memory on every rank, every peer's mapped here. In VMM
        mode the memory is one physical allocation per segment cut at ``boundaries``."""
        self._check_open()
        return CudaIpcHeap(self, nbytes, boundaries)

    def alloc_buffer(self, nbytes: int, boundaries: Sequence[int] = ()) -> DeviceBuffer:
        """A local buffer (prefetch slot): VMM memory in ``vmm`` mode, one physical allocation per
        segment cut at ``boundaries`` (so composites can map its pages), ``cudaMalloc`` otherwise."""
        self._check_open()
        if self.mode != "vmm":
            return super().alloc_buffer(nbytes)
        return DeviceBuffer(VmmAlloc.create(nbytes, self.device_index, self.granularity, exportable=False,
                                            boundaries=boundaries if self.map_granularity else ()),
                            nbytes, tracker=self)

    def copy_engine(self, heap: SymmetricHeap, **options: Any) -> CopyExecutor:
        """The copy-engine executor over ``heap``.

        Options: ``streams``, ``api``, ``distribute``, ``overlap_hint``, ``sync`` (see
        :func:`dwdp_comm.engine_options.parse_engine_options`, :class:`~.cuda.executor.CopyExecutor` and,
        with ``sync``, :class:`~.cuda.time_division.TimeDivisionExecutor`);
        an unknown option or a bad value raises ``InvalidArgumentError`` naming it.

        Notes
        -----
        Local (not collective), except with ``sync="slot"`` or ``"source"``: then creating the engine
        is **collective** (every rank, same options, same order): it allocates the flag words as a
        small symmetric heap of this backend (peers' flag arrays mapped like heaps), tests them with
        a handshake, and ``close()`` of the engine is collective too.
        """
        self._check_open()
        opts = parse_engine_options(options, self.name)
        if not isinstance(heap, CudaIpcHeap):
            raise bad_arg("heap", type(heap).__name__, "a heap of this cuda_ipc backend")
        sync = opts.pop("sync")
        where = dict(device=self.device_index, rank=self.comm.rank, group_size=self.comm.size,
                     src_ptrs=heap.peer_ptrs, src_nbytes=heap.nbytes)
        if sync == "none":
            return CopyExecutor(**where, **opts)
        flags = create_sync_flags(self.comm, self.device_index, sync=sync, streams=opts["streams"],
                                  distribute=opts["distribute"],
                                  alloc=lambda n: CudaIpcHeap(self, max(n, 2 << 20)))  # a whole allocation
        return TimeDivisionExecutor(flags=flags, **where, **opts)

    def compose(self, pieces: Sequence[tuple[Buffer, int, int]]) -> CudaComposite:
        """Map ``(buffer, offset, nbytes)`` pieces back to back into one device range (VMM mode;
        offsets and sizes multiples of ``map_granularity``). Zero copy."""
        self._check_open()
        if self.map_granularity is None:
            raise NotImplementedError(f"cuda_ipc in {self.mode} mode cannot compose views ({self.mode_reason})")
        for buf, _, _ in pieces:
            if not isinstance(buf, DeviceBuffer):
                raise bad_arg("pieces", type(buf).__name__, "DeviceBuffer pieces")
        return CudaComposite(pieces, self.device_index, self.map_granularity)


def _marker(rank: int, k: int) -> int:
    return (rank * 7 + k + 1) & 0xFF


def _read_byte(ptr: int) -> int:
    rt, _ = load()
    out = ctypes.c_ubyte(0)
    check(rt.cudaMemcpy(ctypes.addressof(out), ptr, 1, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy",
          "reading a marker byte")
    return int(out.value)


def probe() -> str | None:
    """None when cuda.bindings imports and torch sees a CUDA device, else why not."""
    return cuda_probe()
