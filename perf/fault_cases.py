"""Fault cases of the failure model (docs/design.md) as rank functions: what perf/fault_times.py
times on sim, and what tests/cpu/test_faults.py checks (it imports them from here).

Each case makes one rank fail (a shard that cannot be placed, a late or dead rank, an exception
inside ``with store``, a failed copy, a write into the heap, NVSHMEM collectives with a fake
nvshmem4py) and returns what every rank raised and how long after the fault, measured inside the
ranks. Run them with :func:`dwdp_comm.launch.launch`.
"""

from __future__ import annotations

import sys
import time
import zlib

import torch

import dwdp_comm as dc
from dwdp_comm.backends.base import CopyEngine, Event

# name -> (per-expert shape, dtype): "w13" experts are one 4 KiB page (composite views on sim),
# "w2" experts are not (gather mode).
NAMES = {"w13": ((16, 64), torch.float32), "w2": ((8, 12), torch.bfloat16)}


def expert_values(seed: int, layer: int, name: str, expert: int) -> torch.Tensor:
    """Expert ``expert``'s tensor of ``name`` in ``layer``: the same on every rank for one ``seed``."""
    shape, dtype = NAMES[name]
    g = torch.Generator().manual_seed((seed * 1_000_003 + layer * 10_007 + zlib.crc32(name.encode()) * 31 + expert)
                                      % (2**63))
    return torch.randn(shape, generator=g).to(dtype)


def filled_store(group, num_experts: int, layers, seed: int) -> dc.WeightStore:
    """A committed store of :data:`NAMES` in ``layers``, each rank's shard from :func:`expert_values`."""
    lay = dc.ExpertLayout(num_experts, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    for layer in layers:
        for name in NAMES:
            st.register(layer, name, torch.stack([expert_values(seed, layer, name, e) for e in lay.local_experts]))
    st.commit()
    return st


def prefetch_works(group, seed: int) -> bool:
    """Collective: a new store of 7 experts commits and a prefetch of each of its 2 layers delivers
    every expert's bytes (the group is usable)."""
    st = filled_store(group, 7, [0, 1], seed)
    ok = True
    with dc.Prefetcher(st, depth=1, chunk_nbytes=1000) as pf:
        for layer in (0, 1):
            h = pf.prefetch(layer)
            h.wait()
            for n in NAMES:
                want = torch.stack([expert_values(seed, layer, n, e) for e in range(7)])
                ok = ok and torch.equal(h.weights(n).view(torch.uint8), want.view(torch.uint8))
            h.release()
    st.close()
    return ok


def error_of(fn) -> tuple[str, str] | None:
    """``(type name, message)`` of the DwdpError ``fn()`` raises, or None when it returns."""
    try:
        fn()
    except dc.DwdpError as exc:
        return type(exc).__name__, str(exc)
    return None


def error_fields(exc) -> dict:
    """What a rank reports about an error it caught: type, message, missing ranks, ranks at fault."""
    return {"type": type(exc).__name__, "msg": str(exc), "missing": getattr(exc, "missing", None),
            "ranks": sorted(getattr(exc, "ranks", {}) or {})}



def commit_local_failure(group, bad_rank: int, kind: str, seed: int):
    """Rank ``bad_rank`` registers a shard that cannot be placed (meta or sparse); every rank must
    raise the same error naming it, none may return from commit(); the group stays usable."""
    lay = dc.ExpertLayout(7, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    n = lay.num_local_experts
    shard = torch.randn(n, 3, 5)
    if group.rank == bad_rank:
        shard = torch.empty(n, 3, 5, device="meta") if kind == "meta" else torch.zeros(n, 3, 5).to_sparse()
    st.register(0, "w", shard)
    t0 = time.perf_counter()
    out = {"error": None}
    try:
        st.commit()
    except dc.DwdpError as exc:
        out["error"] = error_fields(exc)
    out["time_to_error_s"] = time.perf_counter() - t0
    out["closed"] = st.closed
    out["use_after"] = error_of(lambda: st.local(0, "w"))
    # The group still works: a good store commits and prefetches every byte.
    out["after_ok"] = prefetch_works(group, seed)
    return out


def stuck_rank(group, bad_rank: int, stuck_s: float):
    """Rank ``bad_rank`` is late by ``stuck_s`` (> the group's timeout); the others' barrier must
    raise CollectiveTimeoutError naming it."""
    if group.rank == bad_rank:
        time.sleep(stuck_s)
        return None
    t0 = time.perf_counter()
    try:
        group.barrier()
    except dc.DwdpError as exc:
        return dict(error_fields(exc), time_to_error_s=time.perf_counter() - t0)
    return None


def dead_rank(group, bad_rank: int, where: str, report_dir: str):
    """Rank ``bad_rank`` dies (os._exit) before a barrier, or inside commit's heap step; survivors
    write what they raised to ``report_dir`` (launch kills them soon after)."""
    import json
    import os
    lay = dc.ExpertLayout(5, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    st.register(0, "w", torch.randn(lay.num_local_experts, 3, 1000))
    if where == "commit" and group.rank == bad_rank:
        impl, alloc = group.impl, group.impl.alloc_symmetric

        def dying_alloc(*a, **k):
            alloc(*a, **k)
            os._exit(3)  # after this rank created its heap file: inside commit's heap step
        impl.alloc_symmetric = dying_alloc
    if where == "barrier" and group.rank == bad_rank:
        os._exit(3)
    t0 = time.perf_counter()
    try:
        st.commit()
        if where == "barrier":
            group.barrier()
        out = None
    except dc.DwdpError as exc:
        out = dict(error_fields(exc), time_to_error_s=time.perf_counter() - t0)
    except Exception as exc:  # a raw transport error: what the fix removes
        out = dict(type=f"raw {type(exc).__name__}", msg=str(exc), missing=None, ranks=[],
                   time_to_error_s=time.perf_counter() - t0)
    with open(os.path.join(report_dir, f"rank{group.rank}.json"), "w") as f:
        json.dump(out, f)
    time.sleep(30)  # stay until launch kills us (the dead rank is the root cause it reports)


def exit_during_exception(group, bad_rank: int):
    """Rank ``bad_rank`` raises inside ``with WeightStore(...)``: its __exit__ must release locally at
    once (no collective); the others' close() must fail naming it instead of returning normally."""
    lay = dc.ExpertLayout(5, group.size, group.rank)
    out = {"exit_s": None, "error": None}
    st = dc.WeightStore(group, lay)
    st.register(0, "w", torch.randn(lay.num_local_experts, 1024))
    st.commit()
    if group.rank == bad_rank:
        t0 = time.perf_counter()
        try:
            with st, dc.Prefetcher(st) as pf:
                pf.prefetch(0).wait()
                raise ValueError("user code failed on one rank")
        except ValueError:
            out["exit_s"] = time.perf_counter() - t0
        out["closed"] = st.closed
        time.sleep(3 * group.comm.timeout_s)  # alive but never in the collective: the others time out
        return out
    t0 = time.perf_counter()
    try:
        st.close()
    except dc.DwdpError as exc:
        out["error"] = dict(error_fields(exc), time_to_error_s=time.perf_counter() - t0)
    return out


def steps_mismatch(group):
    """Rank 0 enters a barrier while the others commit: nobody may return normally; every rank
    raises CollectiveMismatchError naming each rank's step."""
    lay = dc.ExpertLayout(5, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    st.register(0, "w", torch.randn(lay.num_local_experts, 3))
    t0 = time.perf_counter()
    out = None
    try:
        group.barrier() if group.rank == 0 else st.commit()
    except dc.DwdpError as exc:
        out = dict(error_fields(exc), time_to_error_s=time.perf_counter() - t0)
    st.abort()
    return out


class _FailingEvent(Event):
    def wait(self, stream=None):
        self.synchronize()

    def synchronize(self):
        raise dc.DwdpError("injected copy failure (test)")

    @property
    def is_done(self):
        return True


class _FailingEngine(CopyEngine):
    """A copy engine whose every job fails (fault injection through the public Backend interface)."""

    def __init__(self, inner):
        self.inner = inner

    def submit(self, plan, *, src_base, dst, dst_base, after=()):
        return _FailingEvent()

    def close(self):
        self.inner.close()


def close_with_failed_copy(group, bad_rank: int, seed: int):
    """Rank ``bad_rank``'s prefetch copy fails and is found only when the store closes: every rank's
    WeightStore.close() must raise the same CollectiveFailedError naming it."""
    st = filled_store(group, 5, [0], seed)
    if group.rank == bad_rank:
        make = group.impl.copy_engine
        group.impl.copy_engine = lambda heap, **o: _FailingEngine(make(heap, **o))
    pf = dc.Prefetcher(st, depth=1)
    pf.prefetch(0)  # never waited: the failure surfaces in close()
    t0 = time.perf_counter()
    try:
        st.close()
    except dc.DwdpError as exc:
        return dict(error_fields(exc), closed=st.closed, time_to_error_s=time.perf_counter() - t0)
    return None


def heap_write_detection(group, writer: int, seed: int):
    """Writes that reach a rank's heap (as a write through a GPU composite view does) are found by
    dwdp_comm.testing.check_local_unchanged on every rank; writes through sim's copy-on-write views
    are not writes to the heap and pass the check."""
    st = filled_store(group, 7, [0, 1], seed)
    digest = dc.testing.local_digest(st)
    out = {"keys": sorted(map(list, digest))}
    pf = dc.Prefetcher(st, depth=1)
    h = pf.prefetch(0)
    h.wait()
    if group.rank == writer:  # through the views: copy-on-write on sim
        for n in NAMES:
            h.weights(n).view(torch.uint8).bitwise_not_()
            st.local(0, n).view(torch.uint8).bitwise_not_()
    h.release()
    out["after_views"] = error_of(lambda: dc.testing.check_local_unchanged(st, digest))
    if group.rank == writer:  # straight into the heap: what a write through a GPU composite view does
        st.heap.local.tensor(st.placement(1, "w2").heap_offset, 1).bitwise_not_()
    t0 = time.perf_counter()
    try:
        dc.testing.check_local_unchanged(st, digest)
        out["after_heap_write"] = None
    except dc.DwdpError as exc:
        out["after_heap_write"] = dict(error_fields(exc), time_to_error_s=time.perf_counter() - t0)
    out["bad_digest"] = error_of(lambda: dc.testing.check_local_unchanged(st, {"not": "a digest"}))
    pf.close()
    st.close()
    return out


class FakeNvshmem:
    """Stands in for ``nvshmem.core`` and ``nvshmem.bindings`` in ``sys.modules``: records every call
    that is collective inside real NVSHMEM (``buffer``, ``free``: a missing PE hangs them forever)."""

    def __init__(self, rank: int):
        import types
        self.calls: list[str] = []
        self._next = 0x7f0000000000 + rank * (1 << 32)
        core, bindings, pkg = (types.ModuleType(n) for n in ("nvshmem.core", "nvshmem.bindings", "nvshmem"))
        core.buffer, core.free = self.buffer, self.free
        bindings.ptr = lambda ptr, pe: ptr + pe
        pkg.core, pkg.bindings = core, bindings
        self.modules = {"nvshmem": pkg, "nvshmem.core": core, "nvshmem.bindings": bindings}

    def buffer(self, size):
        import types
        self.calls.append("buffer")
        self._next += size
        return types.SimpleNamespace(handle=self._next - size, size=size)

    def free(self, buf):
        self.calls.append("free")

    def install(self):
        sys.modules.update(self.modules)


def _fake_nvshmem_backend(group):
    import types
    import weakref
    live = weakref.WeakSet()
    return types.SimpleNamespace(comm=group.comm, device_index=0, live=live, track=live.add)


def nvshmem_heap_abort(group, failing_rank: int):
    """Rank ``failing_rank`` aborts its NVSHMEM heap (an exception unwinds there); the others close
    theirs. The failing rank must release locally (no group step, no NVSHMEM collective); the others
    must raise naming it, without entering ``nvshmem_free`` (which would wait for it forever)."""
    from dwdp_comm.backends.nvshmem import NvshmemHeap
    fake = FakeNvshmem(group.rank)
    fake.install()
    heap = NvshmemHeap(_fake_nvshmem_backend(group), 5000)
    fake.calls.clear()
    out = {"error": None}
    t0 = time.perf_counter()
    if group.rank == failing_rank:
        heap.abort()
        heap.abort()
        heap.close()  # after abort: nothing left to do
        out["seconds"] = time.perf_counter() - t0
        time.sleep(3 * group.comm.timeout_s)  # alive but never in the collective
    else:
        try:
            heap.close()
        except dc.DwdpError as exc:
            out["error"] = dict(error_fields(exc), time_to_error_s=time.perf_counter() - t0)
        out["released"] = heap.local.closed
        heap.close()  # idempotent, also after a failed close
    out["calls"] = list(fake.calls)
    return out


def nvshmem_heap_late_rank(group, late_rank: int):
    """Rank ``late_rank`` never allocates the heap; the others must raise naming it before entering
    ``nvshmem.core.buffer`` (collective inside NVSHMEM: it would wait forever)."""
    from dwdp_comm.backends.nvshmem import NvshmemHeap
    fake = FakeNvshmem(group.rank)
    fake.install()
    if group.rank == late_rank:
        time.sleep(3 * group.comm.timeout_s)
        return None
    t0 = time.perf_counter()
    try:
        NvshmemHeap(_fake_nvshmem_backend(group), 5000)
        err = None
    except dc.DwdpError as exc:
        err = dict(error_fields(exc), time_to_error_s=time.perf_counter() - t0)
    return {"error": err, "calls": list(fake.calls)}


def finish_or_sleep(group, sleepers):
    """Ranks in ``sleepers`` never finish; the others return at once."""
    if group.rank in sleepers:
        time.sleep(3600)
    return group.rank


def pid_and_sleep(group, pid_dir: str):
    """Write this rank's pid, then sleep (the test kills the launching parent with SIGKILL)."""
    import os
    with open(os.path.join(pid_dir, f"rank{group.rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
