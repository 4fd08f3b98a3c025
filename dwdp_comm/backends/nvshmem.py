"""The ``nvshmem`` backend: the heap is NVSHMEM symmetric memory (nvshmem4py); the path past one node.

Bootstrap
    Rank 0 makes an NVSHMEM unique id; it travels to every rank over the torch.distributed group
    (:class:`~dwdp_comm.comm.Comm`), and each rank calls ``nvshmem.core.init(device=...,
    uid=..., rank=group rank, nranks=group size, initializer_method="uid")``, so NVSHMEM PE
    numbers equal group ranks. If NVSHMEM was already initialised in this process with the same
    rank and size, it is reused and not finalised on close.

Heap and copies
    ``alloc_symmetric`` is ``nvshmem.core.buffer`` (collective). For every peer, ``nvshmem_ptr``
    (``nvshmem.bindings.ptr``, what ``get_peer_buffer`` wraps) gives the address of the peer's copy
    in this process when the peer is reachable by loads and stores (NVLink / P2P peers): those copies
    are raw ``cudaMemcpyAsync`` (or ``cudaMemcpyBatchAsync``) on the shared executor's copy streams,
    exactly as on ``cuda_ipc``. Peers without a peer mapping (other nodes) are read with
    ``nvshmemx_getmem_on_stream`` (``nvshmem.bindings.getmem_on_stream``) on the same copy stream,
    in plan order with the rest. ``map_granularity`` is None: every tensor uses the store's gather
    mode (no composite views), so every prefetch also copies the local experts into the slot; the
    executor runs those local copies on a copy stream of their own, overlapping the peers' copies.

Slots
    When every peer is mapped, prefetch slots are ordinary local ``cudaMalloc`` buffers. When some
    peer is not (several nodes), slots are allocated from the symmetric heap too, because the remote
    transport (InfiniBand / RoCE) can only write into registered memory; then creating a
    ``Prefetcher`` is collective (every rank must create its prefetchers in the same order, as any
    symmetric program does).

Failures
    NVSHMEM's own collectives (``nvshmem_malloc``, ``nvshmem_free``, ``nvshmem_finalize``) have no
    timeout: a PE that never arrives hangs the others forever. So every one of them is entered only
    after a step of the group (:class:`~dwdp_comm.comm.Comm`, bounded by its timeout) saw every PE
    arrive; a missing PE makes the others raise :class:`~dwdp_comm.errors.CollectiveTimeoutError`
    naming it instead. ``abort()`` (heap and backend; what ``__exit__`` runs while an exception
    unwinds) is local: it never enters a collective, and gives its symmetric buffers up (kept
    referenced until the process exits: freeing them is collective).

Running across nodes (one process per GPU; e.g. 2 nodes x 8 GPUs)::

    # on every node, same MASTER_ADDR/PORT; torchrun sets RANK, LOCAL_RANK, WORLD_SIZE
    export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=eth0      # interface the uid bootstrap listens on
    export NVSHMEM_SYMMETRIC_SIZE=64G                  # >= heap + symmetric slots per GPU
    export NVSHMEM_IB_ENABLE_IBGDA=1                   # optional: GPU-initiated IB (ConnectX-6+)
    export NVSHMEM_DISABLE_NVLS=1                      # keep NVLink multicast off where required
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:29500 app.py
    # app.py: torch.cuda.set_device(int(os.environ["LOCAL_RANK"])); dist.init_process_group("gloo"...)
    #         group = dwdp_comm.init(backend="nvshmem")

    Peers on the same node are read through NVLink peer views (copy engine); peers on other nodes
    through NVSHMEM gets over the remote transport. ``backend="auto"`` picks ``nvshmem`` when the
    group spans hosts (``cuda_ipc`` is skipped there).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Sequence

import numpy as np

from ..checks import align_up
from ..comm import describe
from ..errors import BackendUnavailableError, bad_arg
from ..engine_options import parse_engine_options
from .cuda.backend import CudaBackendBase, cuda_probe
from .cuda.executor import CopyExecutor
from .cuda.memory import DeviceBuffer, ForeignAlloc
from .cuda.peers import agree, raise_gathered
from .cuda.sync_flags import create_sync_flags
from .cuda.time_division import TimeDivisionExecutor
from .base import SymmetricHeap

__all__ = ["NvshmemBackend", "probe"]

log = logging.getLogger("dwdp_comm")

_INSTALL = ("install nvshmem4py (pip install nvshmem4py-cu13, or nvshmem4py-cu12 for CUDA 12 drivers; its "
            "dependencies nvidia-nvshmem-cu13, cuda-core and cuda-bindings come with it)")
_ALTERNATIVES = "backend='cuda_ipc' (one host) or backend='sim' (CPU)"
_ALIGN = 2 << 20  # keep symmetric allocations granule-aligned
_state = {"initialized_by_us": False, "users": 0}
_LEAKED_ON_ABORT: list = []  # symmetric buffers given up by abort(): nvshmem_free is collective


def _nvshmem():
    """``nvshmem.core`` and ``nvshmem.bindings``, imported on first use."""
    import nvshmem.bindings as nvb
    import nvshmem.core as nvc
    return nvc, nvb


def _device_cls():
    try:
        from cuda.core import Device
    except ImportError:  # cuda.core < 0.4
        from cuda.core.experimental import Device
    return Device


def _is_initialized(nvc) -> bool:
    try:
        from nvshmem.core._internal_tracking import InternalInitStatus, _is_initialized as status
        return status["status"] == InternalInitStatus.INITIALIZED
    except Exception:
        return False


class NvshmemHeap(SymmetricHeap):
    """An NVSHMEM symmetric buffer of ``nbytes`` on every PE. Collective to create and close.

    Attributes
    ----------
    local : DeviceBuffer
        This PE's part (its address is also the symmetric address NVSHMEM gets read at).
    peer_ptrs : list of int or None
        Each PE's part as mapped in this process (``nvshmem_ptr``); None without a peer mapping.
    """

    def __init__(self, backend: "NvshmemBackend", nbytes: int):
        nvc, nvb = _nvshmem()
        comm = backend.comm
        self.nbytes, self._comm, self._backend = int(nbytes), comm, backend
        size = align_up(max(self.nbytes, 1), _ALIGN)
        self._closed = True  # until built: nothing to release
        self._buf, err = None, None
        comm.barrier("nvshmem: allocating the symmetric heap")  # nvshmem_malloc waits for every PE, forever
        try:
            self._buf = nvc.buffer(size)  # collective inside NVSHMEM
            ptr = int(self._buf.handle)
            self.peer_ptrs = [int(nvb.ptr(ptr, pe)) or None for pe in range(comm.size)]
            self.peer_ptrs[comm.rank] = ptr
        except Exception as exc:
            err = f"nvshmem.core.buffer({size}): {describe(exc)}"
        try:
            agree(comm, err, "nvshmem: allocating the symmetric heap", BackendUnavailableError,
                  "is NVSHMEM_SYMMETRIC_SIZE large enough for the heap and symmetric slots?")
        except BaseException:
            if self._buf is not None:  # allocated here but not everywhere: freeing it is collective
                _LEAKED_ON_ABORT.append(self._buf)
            raise
        self._alloc = ForeignAlloc(ptr, size, backend.device_index, keepalive=self._buf)
        self.local = DeviceBuffer(self._alloc, self.nbytes, tracker=backend)
        self.sym_ptr = ptr
        self._closed = False

    def close(self) -> None:
        """Collective: wait until no PE reads this heap, then ``nvshmem.core.free`` it. Idempotent.

        Every PE first meets in a step of the group (bounded by its timeout): if one does not come
        (it aborted, died or is stuck), the heap is released locally as by :meth:`abort` and the
        step's :class:`~dwdp_comm.errors.CollectiveTimeoutError` / ``TransportError`` naming it is
        raised, instead of entering ``nvshmem_free``, which would wait for it forever. Views of the
        heap must not be used afterwards (the memory returns to NVSHMEM's heap)."""
        if self._closed:
            return
        nvc, _ = _nvshmem()
        try:
            self._comm.barrier("nvshmem: closing the heap")
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.local.close()
        self._alloc.free()
        buf, self._buf = self._buf, None
        nvc.free(buf)  # collective; every PE is here

    def abort(self) -> None:
        """Local release, no collective step: this PE stops using the heap; the symmetric buffer is
        given up, not freed (``nvshmem_free`` is collective), and stays allocated until the process
        exits, so peers still reading it read valid memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.local.close()
        _LEAKED_ON_ABORT.append(self._buf)
        self._buf = None


class _SymmetricSlot(ForeignAlloc):
    """A prefetch slot in symmetric memory (multi-node); freed collectively by the backend."""

    kind = "NVSHMEM slot"


class NvshmemBackend(CudaBackendBase):
    """NVSHMEM heap backend (one or several hosts). Collective to create and to close.

    Attributes
    ----------
    mapped : list of bool
        Whether each PE is reachable through a peer mapping (else NVSHMEM gets move its copies).
    """

    name = "nvshmem"

    def __init__(self, comm):
        err = None
        try:
            super().__init__(comm)
            nvc, nvb = _nvshmem()
        except ImportError as exc:
            err = f"cannot import nvshmem4py ({exc}); {_INSTALL}"
        except Exception as exc:
            err = describe(exc)
        agree(comm, err, "nvshmem: setting up", BackendUnavailableError, f"use {_ALTERNATIVES}")
        self._init_nvshmem(nvc)
        # Which peers can we read by address? Probe with a one-granule symmetric buffer.
        err, mapped = None, None
        try:
            probe_buf = nvc.buffer(_ALIGN)
            try:
                p = int(probe_buf.handle)
                mapped = [pe == comm.rank or bool(nvb.ptr(p, pe)) for pe in range(comm.size)]
            finally:
                nvc.free(probe_buf)
        except Exception as exc:
            err = f"probing peer mappings: {describe(exc)}"
        agree(comm, err, "nvshmem: probing peer mappings")
        self.mapped = mapped
        self._slots: list = []
        if not all(mapped):
            log.info("dwdp_comm: nvshmem rank %d reads PEs %s through NVSHMEM gets (no peer mapping)", comm.rank,
                     [pe for pe, m in enumerate(mapped) if not m])

    def _init_nvshmem(self, nvc) -> None:
        comm = self.comm
        if _is_initialized(nvc):
            err = None
            if (nvc.my_pe(), nvc.n_pes()) != (comm.rank, comm.size):
                err = (f"NVSHMEM is already initialised in this process as PE {nvc.my_pe()} of {nvc.n_pes()}, "
                       f"but this is rank {comm.rank} of {comm.size}")
            agree(comm, err, "nvshmem: reusing the running NVSHMEM")
            _state["users"] += 1
            return
        err, uid_bytes = None, None
        if comm.rank == 0:
            try:
                uid = nvc.get_unique_id()
                uid_bytes = uid._data.view(np.int8).tobytes()
            except Exception as exc:
                err = f"nvshmem.core.get_unique_id(): {describe(exc)}"
        got = comm.all_gather_object((err, uid_bytes))
        raise_gathered([e for e, _ in got], "nvshmem: making the unique id")
        uid_bytes = got[0][1]
        err = None
        try:
            uid = nvc.get_unique_id(empty=True)
            uid._data.view(np.int8)[:] = np.frombuffer(uid_bytes, dtype=np.int8)
            nvc.init(device=_device_cls()(self.device_index), uid=uid, rank=comm.rank, nranks=comm.size,
                     initializer_method="uid")
        except Exception as exc:
            err = (f"nvshmem.core.init(rank={comm.rank}, nranks={comm.size}): {describe(exc)} (across hosts, set "
                   f"NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME to an interface every host reaches)")
        agree(comm, err, "nvshmem: initialising NVSHMEM", BackendUnavailableError, f"or use {_ALTERNATIVES}")
        _state["initialized_by_us"] = True
        _state["users"] += 1

    # ---- Backend interface --------------------------------------------------------------------------
    def alloc_symmetric(self, nbytes: int, boundaries: Sequence[int] = ()) -> NvshmemHeap:
        """Collective: ``nbytes`` of NVSHMEM symmetric memory on every PE."""
        self._check_open()
        return NvshmemHeap(self, nbytes)

    def alloc_buffer(self, nbytes: int, boundaries: Sequence[int] = ()) -> DeviceBuffer:
        """A prefetch slot: local ``cudaMalloc`` when every peer is mapped; symmetric memory (and then
        collective) when some peer is only reachable through NVSHMEM gets."""
        self._check_open()
        if all(self.mapped):
            return super().alloc_buffer(nbytes)
        nvc, _ = _nvshmem()
        size = align_up(max(int(nbytes), 1), _ALIGN)
        self.comm.barrier("nvshmem: allocating a symmetric slot")  # nvshmem_malloc waits for every PE, forever
        buf, err = None, None
        try:
            buf = nvc.buffer(size)  # collective
        except Exception as exc:
            err = f"nvshmem.core.buffer({size}): {describe(exc)}"
        try:
            agree(self.comm, err, "nvshmem: allocating a symmetric slot", BackendUnavailableError,
                  "is NVSHMEM_SYMMETRIC_SIZE large enough for the heap and symmetric slots?")
        except BaseException:
            if buf is not None:
                _LEAKED_ON_ABORT.append(buf)
            raise
        alloc = _SymmetricSlot(int(buf.handle), size, self.device_index, keepalive=buf)
        self._slots.append(buf)
        return DeviceBuffer(alloc, nbytes, tracker=self)

    def copy_engine(self, heap: SymmetricHeap, **options: Any) -> CopyExecutor:
        """The shared copy-engine executor: peer views with raw CUDA copies, NVSHMEM gets for
        unmapped PEs.

        Options: ``streams``, ``api``, ``distribute``, ``overlap_hint``, ``sync`` (see
        :func:`dwdp_comm.engine_options.parse_engine_options`, :class:`~.cuda.executor.CopyExecutor` and,
        with ``sync``, :class:`~.cuda.time_division.TimeDivisionExecutor`);
        an unknown option or a bad value raises ``InvalidArgumentError`` naming it.

        Notes
        -----
        Local (not collective), except with ``sync="slot"`` or ``"source"``: then creating the engine
        is **collective** (every PE, same options, same order): the flag words are a small NVSHMEM
        symmetric buffer; mapped PEs' words are written with stream write-value operations through
        ``nvshmem_ptr``, unmapped PEs' with ``nvshmemx_signal_op_on_stream`` (``NVSHMEM_SIGNAL_SET``).
        ``close()`` of the engine is collective too.
        """
        self._check_open()
        opts = parse_engine_options(options, self.name)
        if not isinstance(heap, NvshmemHeap):
            raise bad_arg("heap", type(heap).__name__, "a heap of this nvshmem backend")
        _, nvb = _nvshmem()

        def remote_get(dst: int, sym_src: int, nbytes: int, pe: int, stream: int) -> None:
            nvb.getmem_on_stream(dst, sym_src, nbytes, pe, stream)

        sync = opts.pop("sync")
        where = dict(device=self.device_index, rank=self.comm.rank, group_size=self.comm.size,
                     src_ptrs=heap.peer_ptrs, src_nbytes=heap.nbytes, remote_get=remote_get, sym_ptr=heap.sym_ptr)
        if sync == "none":
            return CopyExecutor(**where, **opts)

        def remote_signal(sym_addr: int, value: int, pe: int, stream: int) -> None:
            # Only PEs without a peer mapping (other nodes) take this path.
            nvb.signal_op_on_stream(sym_addr, value, int(nvb.Signal_op.SIGNAL_SET), pe, stream)

        flags = create_sync_flags(self.comm, self.device_index, sync=sync, streams=opts["streams"],
                                  distribute=opts["distribute"], alloc=lambda n: NvshmemHeap(self, n),
                                  remote_signal=remote_signal)
        return TimeDivisionExecutor(flags=flags, **where, **opts)

    def close(self) -> None:
        """Collective: free symmetric slots, report leaks, finalise NVSHMEM if this backend started it.
        Idempotent.

        Every PE first meets in a step of the group (bounded by its timeout); if one does not come,
        the backend is released locally as by :meth:`abort` and that step's error, naming it, is
        raised (``nvshmem_free`` and ``nvshmem_finalize`` would wait for it forever)."""
        if self._closed:
            return
        nvc, _ = _nvshmem()
        try:
            self.synchronize()
            self.comm.barrier("nvshmem: closing the backend")
        except BaseException:
            self.abort()
            raise
        for buf in self._slots:
            nvc.free(buf)  # collective, like their allocation; every PE is here
        self._slots = []
        super().close()
        _state["users"] -= 1
        if _state["users"] == 0 and _state["initialized_by_us"]:
            nvc.finalize()  # collective; every PE passed the step above
            _state["initialized_by_us"] = False

    def abort(self) -> None:
        """Local release, no collective step and no device synchronisation (a copy may wait for a
        peer that never comes): symmetric slots are given up (kept allocated until the process
        exits), NVSHMEM stays initialised (``nvshmem_finalize`` is collective). Idempotent."""
        if self._closed:
            return
        _LEAKED_ON_ABORT.extend(self._slots)
        self._slots = []
        _state["users"] -= 1
        super().close()


def probe() -> str | None:
    """None when cuda.bindings, a CUDA device and nvshmem4py are all there, else why not."""
    def package() -> str | None:
        if importlib.util.find_spec("nvshmem") is None:
            return f"nvshmem4py is not installed; {_INSTALL}; or use {_ALTERNATIVES}"
        try:
            _nvshmem()
        except Exception as exc:
            return f"cannot import nvshmem.core (nvshmem4py): {describe(exc)}; {_INSTALL}; or use {_ALTERNATIVES}"
        return None
    # The package first: its absence is the more specific reason (and testable without a GPU).
    return package() or cuda_probe()
