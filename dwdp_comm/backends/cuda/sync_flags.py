"""The flag words of time-division copy engines (``sync="slot"`` / ``"source"``).

The paper's mechanism for groups of 3+ ranks: flag words in symmetric memory that copy streams write
(progress) and wait on (stream memory operations), so that each plan slot stays a permutation even
when ranks drift. :class:`SyncFlags` holds the words and their collective steps (handshake,
settle, close), :func:`create_sync_flags` makes them (collective). What a job enqueues around its
copies is built by :mod:`.time_division`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from ...errors import CollectiveMismatchError, DwdpError, InvalidArgumentError, bad_arg
from ...lanes import lanes_of_source
from .copies import (MEMOP_DTYPE, OP_WAIT_VALUE_32, OP_WAIT_VALUE_64, OP_WRITE_VALUE_32, OP_WRITE_VALUE_64,
                     WAIT_VALUE_GEQ, WRITE_VALUE_DEFAULT, DriverCopyCalls, issue_memops)
from .driver import CudaError, check, load, log
from .peers import agree, raise_gathered
from .streams import CudaStream

__all__ = ["stream_memop_bits", "SyncFlags", "create_sync_flags"]


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
        if self.mode == "source":
            return lanes_of_source(key, writer, group_size=self.group_size, streams=self.num_lanes,
                                   distribute=self.distribute)
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

    def read_local(self, word: int, count: int, stream: "CudaStream") -> np.ndarray:
        """Words ``[word, word + count)`` of this rank's array, masked to the flag width (blocks the
        host on ``stream``)."""
        rt, _ = load()
        out = np.zeros(count, dtype=np.uint64)
        check(rt.cudaMemcpyAsync(out.ctypes.data, self.local_ptr + self.WORD * word, self.WORD * count,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.raw), "cudaMemcpyAsync",
              "reading sync flags back")
        stream.synchronize()
        return out & np.uint64(self.mask)

    def write_local(self, words: Sequence[int], value: int, stream: "CudaStream") -> None:
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
                        seen = self.read_local(self.probe_word(0), G, side)
                        self.write_local([self.probe_word(w) for w in range(G)], 1, side)
                        side.synchronize()
                        s.synchronize()
                    finally:
                        side.close()
                    missing = [w for w in range(G) if int(seen[w]) < 1]
                    return (f"rank {me} waited {timeout_s:.0f} s for the handshake flags of ranks {missing}: stream "
                            "writes to peer memory did not arrive (or a rank never got here)")
                time.sleep(poll_s)
            got = self.read_local(self.probe_word(0), G, s)
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
                    self.write_local(words, self.value(c - 1, self.end), side)
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
