"""Time division of the copy plane (``sync="slot"`` / ``"source"``): the executor that runs it and
the flag operations it enqueues around its copies.

:class:`TimeDivisionExecutor` is a :class:`~.executor.CopyExecutor` whose eager jobs wait on and
write the flag words of :class:`~.sync_flags.SyncFlags`; :func:`build_sync_program` turns a plan
into those waits and writes (once per plan, values filled per job).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ...errors import bad_arg
from ...planner import CopyPlan
from .copies import MEMOP_DTYPE, MEMOP_MAX, WAIT_VALUE_GEQ, WRITE_VALUE_DEFAULT, issue_memops
from .executor import CopyExecutor, JobCopies
from .streams import CudaEvent, CudaStream
from .sync_flags import SyncFlags

__all__ = ["TimeDivisionExecutor", "SyncStep", "SyncProgram", "build_sync_program"]


class TimeDivisionExecutor(CopyExecutor):
    """A copy executor with time division on the copy plane (``sync="slot"`` or ``"source"``).

    ``"slot"``: a lane starts the copies of plan slot ``k`` only once every rank finished every copy
    of slots ``< k``, so that each slot is a permutation even when ranks drift. ``"source"``: a copy
    of slot ``k`` from source ``s`` waits only until every rank finished its copies from ``s`` of
    slots ``< k`` (the previous reader of ``s``). This is what :mod:`dwdp_comm.bench.model` models.
    Mechanism (:class:`~.sync_flags.SyncFlags`): flag words in symmetric memory; after its copies of
    a slot, a lane writes its progress into every rank's array (``cuStreamBatchMemOp`` write-value to
    the peer-mapped word, or an NVSHMEM signal), and before the copies of the next slot it waits on
    its own array (wait-value, cyclic ``>=``). Values grow monotonically with a per-engine job
    sequence number folded in, so no word is ever reset. Local copies take no part. Round robin,
    G = 3, rank 0, ``sync="slot"``::

        copy lane    [wait V(0) of all][slot 1: src 2][write V(1) -> all][wait V(1)][slot 2: src 1]...
        local lane   [local copies ........]
        compute      --- layer l --- wait(done event of the prefetch) --- layer l+1 ---
        flag array   word (writer w, lane l) on every rank: V(j, k) = j * 2**32 + k + 1

    Copies within a slot use ``api`` (``"batch"``: one ``cudaMemcpyBatchAsync`` per slot and lane;
    the time-division order within the batch becomes a hint). Lanes are issued slot by slot
    (slot-major), and local copies first: streams beyond the hardware queues
    (``CUDA_DEVICE_MAX_CONNECTIONS``) share a queue in issue order, and a wait must never sit in a
    queue ahead of a write it depends on. A compute stream that shares a queue with a waiting lane
    is delayed by it; keep ``streams`` small.

    The engine is **collective**: creating it allocates the flags collectively (and tests them with
    a handshake: :func:`~.sync_flags.create_sync_flags`), and closing it frees them collectively.
    Every rank must submit the same sequence of jobs (job ``j`` of every rank belongs together; plans
    may differ, an empty plan is fine: it writes "done" at once). A rank that submits fewer jobs
    leaves its peers' copy streams waiting (their done events do not complete). ``close()`` gathers
    the job counts, releases such streams and raises :class:`CollectiveMismatchError`; anything that
    synchronizes on those done events before ``close()`` (e.g. ``Prefetcher.close``) waits forever.
    It refuses CUDA graph capture (the flag values change with every job).

    Parameters
    ----------
    flags : SyncFlags
        Made by :func:`~.sync_flags.create_sync_flags` (collective) for this engine's ``sync``,
        ``streams`` and ``distribute``; the engine owns it.
    sync : {"slot", "source"}, optional
        Must be ``flags.mode`` (default: it).
    **kw
        As :class:`~.executor.CopyExecutor`.
    """

    def __init__(self, *, flags: SyncFlags, sync: str | None = None, device: int, rank: int, group_size: int,
                 src_ptrs: Sequence[int | None], src_nbytes: int, remote_get: Callable | None = None,
                 sym_ptr: int | None = None, streams: int = 1, api: str = "batch", distribute: str = "source",
                 overlap_hint: bool = False):
        if not isinstance(flags, SyncFlags) or flags.mode != (sync or flags.mode) or flags.num_lanes != streams \
                or flags.distribute != distribute or flags.rank != rank or flags.group_size != group_size:
            raise bad_arg("flags", flags, f"the SyncFlags of this engine (create_sync_flags with sync={sync!r}, "
                          f"streams={streams}, distribute={distribute!r}, rank {rank} of {group_size})")
        super().__init__(device=device, rank=rank, group_size=group_size, src_ptrs=src_ptrs, src_nbytes=src_nbytes,
                         remote_get=remote_get, sym_ptr=sym_ptr, streams=streams, api=api, distribute=distribute,
                         overlap_hint=overlap_hint)
        self.sync = flags.mode
        self._flags = flags
        self._programs: dict[int, tuple[CopyPlan, SyncProgram]] = {}

    @property
    def collective(self) -> bool:
        """True: creation and ``close`` are collective."""
        return True

    def capture_refusal(self) -> str | None:
        return (f"copy engine option sync={self.sync!r} (time division) is not supported under CUDA graph "
                "capture: its flag values change with every job, so a replay would wait on stale values; "
                "use sync='none' for the prefetcher of a captured forward")

    def check_plan(self, plan: CopyPlan) -> None:
        if plan.rank != self.rank or plan.group_size != self.group_size:
            raise bad_arg("plan", repr(plan), f"a plan made for rank {self.rank} of a group of {self.group_size} "
                          f"(sync={self.sync!r} pairs job j of every rank)")
        if plan.num_slots > self._flags.max_slots:
            raise bad_arg("plan", f"{plan.num_slots} slots", f"at most {self._flags.max_slots} slots with "
                          f"{self._flags.bits}-bit flags", "use larger chunks")

    # -- a job -------------------------------------------------------------------------------------------
    def _program(self, plan: CopyPlan, c: JobCopies) -> "SyncProgram":
        hit = self._programs.pop(id(plan), None)
        if hit is not None and hit[0] is plan:
            self._programs[id(plan)] = hit  # most recently used last
            return hit[1]
        remote = c.lane != self.local_lane
        prog = build_sync_program(self._flags, c.slot[remote], c.src_rank[remote], c.lane[remote])
        self._programs[id(plan)] = (plan, prog)  # holding the plan keeps its id unique
        while len(self._programs) > 64:
            del self._programs[next(iter(self._programs))]
        return prog

    def enqueue(self, plan: CopyPlan, c: JobCopies, after: Sequence[CudaEvent]) -> CudaEvent:
        f = self._flags
        prog = self._program(plan, c)
        prog.fill(f, self.jobs)
        job = self.jobs
        lanes = self.lane_streams
        remote = c.take(np.flatnonzero(c.lane != self.local_lane))
        local = np.flatnonzero(c.lane == self.local_lane)
        used = sorted({st.lane for st in prog.steps})
        if local.size:  # first: nothing it does waits on a flag
            self.wait_after([self.local_lane], after)
            self.issue(lanes[self.local_lane], c.take(local))
        for ln, (a, b), signals in prog.init:  # "done with the slots I have nothing in": before 'after'
            issue_memops(lanes[ln].handle, prog.ops[a:b], f"lane {ln}: initial flag writes")
            self._signal(lanes[ln], signals, job)
        self.wait_after(used, after)
        self._run_steps(prog, remote.take(prog.perm), job)
        joined = used + ([self.local_lane] if local.size else [])
        if not joined:  # nothing to copy: the done event still follows 'after'
            self.wait_after([0], after)
            joined = [0]
        return self.join(joined)

    def _run_steps(self, prog: "SyncProgram", c: JobCopies, job: int) -> None:
        """Enqueue every step of ``prog`` (``c``: the remote copies in step order). The hot loop of a
        job: direct ctypes calls on precomputed offsets, about a microsecond per call."""
        drv = self._drv
        memops, ops_ptr = drv.memops, int(prog.ops.ctypes.data)
        lanes = self.lane_streams
        mode = "general" if c.remote.any() else self.api
        if mode == "batch":
            d, s, n = (np.ascontiguousarray(a, dtype=np.uint64) for a in (c.dst_addr, c.src_addr, c.nbytes))
            dp, sp, np_ = int(d.ctypes.data), int(s.ctypes.data), int(n.ctypes.data)
        elif mode == "memcpy":
            d, s, n, r = c.dst_addr.tolist(), c.src_addr.tolist(), c.nbytes.tolist(), c.src_rank.tolist()
            memcpy = drv.memcpy
        for st in prog.steps:
            stream = lanes[st.lane]
            h = stream.handle
            self._memops(memops, h, ops_ptr, st.waits, f"lane {st.lane}: flag waits before slot {st.slot}")
            p, q = st.start, st.stop
            if mode == "batch":
                self.batch_call(h, dp + 8 * p, sp + 8 * p, np_ + 8 * p, q - p, f"{q - p} copies of slot {st.slot}")
            elif mode == "memcpy" and memcpy is not None:
                for i in range(p, q):
                    err = memcpy(d[i], s[i], n[i], h)
                    if err:
                        raise drv.error(err, "cuMemcpyAsync", f"{n[i]} bytes from rank {r[i]}'s heap "
                                        f"(0x{s[i]:x} -> 0x{d[i]:x})")
            else:  # NVSHMEM gets among the copies, or no ctypes memcpy: the general path
                self.issue(stream, c.take(slice(p, q)))
            self._memops(memops, h, ops_ptr, st.writes, f"lane {st.lane}: flag writes after slot {st.slot}")
            if st.signals:
                self._signal(stream, st.signals, job)

    def _memops(self, memops, stream: int, ops_ptr: int, span: tuple[int, int], what: str) -> None:
        """Enqueue ops ``[a, b)`` of a program (at ``ops_ptr``) on ``stream``, :data:`MEMOP_MAX` per call."""
        a, b = span
        for o in range(a, b, MEMOP_MAX):
            err = memops(stream, min(MEMOP_MAX, b - o), ops_ptr + MEMOP_DTYPE.itemsize * o, 0)
            if err:
                raise self._drv.error(err, "cuStreamBatchMemOp", what)

    def _signal(self, stream: CudaStream, signals: list, job: int) -> None:
        f = self._flags
        for sym_addr, rel, pe in signals:
            f.remote_signal(sym_addr, f.value(job, rel), pe, stream.handle)

    # -- closing -----------------------------------------------------------------------------------------
    def settle(self) -> str | None:
        """Collective: compare the job counts and synchronize the copy streams (a rank behind is
        released, :meth:`SyncFlags.settle`); the mismatch, or None."""
        return self._flags.settle(self.jobs, self.lane_streams)

    def release_collective(self) -> None:
        """Collective: free the flag words."""
        self._programs.clear()
        self._flags.close()

    def abort_collective(self) -> None:
        """Release the flag words locally (no collective step)."""
        self._programs.clear()
        if self._flags.owner is not None and not self._flags.closed:
            self._flags.closed = True
            self._flags.owner.abort()


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
