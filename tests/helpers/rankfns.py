"""Per-rank functions for multi-process tests (module level, so spawned ranks can unpickle them).

Ground truth: every expert tensor is drawn from a generator seeded by (run seed, layer, name,
expert), so every rank can rebuild the whole [num_experts, ...] tensor of any layer and compare
the bytes it prefetched. The run seed is fresh per test run.
"""

from __future__ import annotations

import sys
import threading
import time
import zlib

import numpy as np
import torch

import dwdp_comm as dc
from dwdp_comm.backends.base import CopyEngine, Event

# name -> (per-expert shape, dtype). On sim, mapping granularity is the 4 KiB page: "w13" (16x64
# float32 = 4 KiB per expert) is served as a composite view, the others through gather mode.
SPECS = {
    "w13": ((16, 64), torch.float32),
    "w2": ((8, 12), torch.bfloat16),
    "w13_scale": ((5,), torch.float8_e4m3fn),
}


def expert_tensor(seed: int, layer: int, name: str, expert: int, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + layer * 10_007 + zlib.crc32(name.encode()) * 31 + expert)
                                      % (2**63))
    if dtype == torch.float8_e4m3fn:  # arbitrary bytes, NaN patterns included: compared as bytes
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(dtype)
    return torch.randn(shape, generator=g).to(dtype)


def full_truth(seed, layer, name, num_experts, specs=SPECS) -> torch.Tensor:
    shape, dtype = specs[name]
    return torch.stack([expert_tensor(seed, layer, name, e, shape, dtype) for e in range(num_experts)])


def build_store(group, num_experts: int, layers, seed: int, specs=SPECS) -> dc.WeightStore:
    lay = dc.ExpertLayout(num_experts, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    for l in layers:
        for name, (shape, dtype) in specs.items():
            st.register(l, name, torch.stack([expert_tensor(seed, l, name, e, shape, dtype) for e in lay.local_experts]))
    st.commit()
    return st


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# ---- end-to-end pipeline -------------------------------------------------------------------------
def pipeline(group, num_experts: int, num_layers: int, depth: int, schedule: str, chunk_nbytes: int, seed: int):
    """Run a DWDP-style loop over more layers than slots; compare every byte of every layer."""
    layers = list(range(0, 2 * num_layers, 2))  # non-consecutive layer ids
    st = build_store(group, num_experts, layers, seed)
    modes = {n: st.slot_mode(layers[0], n) for n in SPECS}
    # The local shard in the heap is the registered data.
    for n in SPECS:
        lay = st.layout
        assert same_bytes(st.local(layers[0], n), full_truth(seed, layers[0], n, num_experts)[lay.local_experts.start:
                                                                                        lay.local_experts.stop])
    pf = dc.Prefetcher(st, depth=depth, schedule=schedule, chunk_nbytes=chunk_nbytes)
    handles = {layers[i]: pf.prefetch(layers[i]) for i in range(min(depth, len(layers)))}
    checked = 0
    for i, l in enumerate(layers):
        h = handles.pop(l)
        h.wait()
        for n in SPECS:
            w = h.weights(n)
            truth = full_truth(seed, l, n, num_experts)
            assert same_bytes(w, truth), f"rank {group.rank}: layer {l} {n} differs"
            segs = h.weight_segments(n)
            assert [s for s, _ in segs][0] == 0 and sum(t.shape[0] for _, t in segs) == num_experts
            for start, t in segs:
                assert same_bytes(t, truth[start:start + t.shape[0]])
            checked += truth.numel() * truth.element_size()
        # Issue the next prefetch *before* releasing this slot, as a MoE layer does: it is
        # deferred until the release when it targets this same slot.
        if i + depth < len(layers):
            handles[layers[i + depth]] = pf.prefetch(layers[i + depth])
        h.release()
    remote = sum(st.remote_nbytes(l) for l in layers)
    stats = (pf.plan_cache.hits, pf.plan_cache.misses, pf.nbytes_prefetched)
    st.close()
    return {"modes": modes, "checked": checked, "remote": remote, "plan_cache": stats}


def partial(group, num_experts: int, seed: int):
    """experts= fetches only some remote experts; absent ones are an error to ask for."""
    st = build_store(group, num_experts, [0, 1], seed)
    lay = st.layout
    wanted = lay.remote_experts[::2]
    out = {}
    with dc.Prefetcher(st, depth=1, chunk_nbytes=512) as pf:
        h = pf.prefetch(0, experts=wanted + list(lay.local_experts))
        h.wait()
        present = set(h.present_experts)
        assert present == set(wanted) | set(lay.local_experts)
        w = h.weights("w13", experts=wanted)
        truth = full_truth(seed, 0, "w13", num_experts)
        for e in present:
            assert same_bytes(w[e], truth[e]), e
        absent = [e for e in lay.remote_experts if e not in present]
        try:
            h.weights("w13")
        except dc.InvalidArgumentError as exc:
            out["default_error"] = str(exc)
        try:
            h.weights("w2", experts=[absent[0]])
        except dc.InvalidArgumentError as exc:
            out["absent_error"] = str(exc)
        out["bytes"] = pf.nbytes_prefetched
        h.release()
        # A full prefetch after a partial one, into the same slot, sees everything.
        h2 = pf.prefetch(1)
        h2.wait()
        assert same_bytes(h2.weights("w2"), full_truth(seed, 1, "w2", num_experts))
        h2.release()
        # The same expert set of a layer of the same shape reuses the partial plan.
        h3 = pf.prefetch(1, experts=wanted)
        h3.wait()
        assert same_bytes(h3.weights("w13", experts=wanted)[wanted], full_truth(seed, 1, "w13", num_experts)[wanted])
        h3.release()
        out["plan_cache"] = (pf.plan_cache.hits, pf.plan_cache.misses)
    st.close()
    return out


def slot_held(group, num_experts: int, seed: int):
    """A slot owned by an unreleased handle is not overwritten; the next prefetch waits for release."""
    st = build_store(group, num_experts, [0, 1], seed)
    # Had the next prefetch into the slot been started, its copies (a few KB) would land during
    # the sleep below and change h0's bytes (layers 0 and 1 hold different data).
    with dc.Prefetcher(st, depth=1, chunk_nbytes=256) as pf:
        h0 = pf.prefetch(0)
        h0.wait()
        w0 = {n: h0.weights(n).clone() for n in SPECS}
        h1 = pf.prefetch(1)  # same slot: must be deferred
        time.sleep(0.3)
        deferred = (not h1.is_submitted, not h1.is_done)
        for n in SPECS:
            assert same_bytes(h0.weights(n), w0[n]), f"slot overwritten while held ({n})"
            assert same_bytes(h0.weights(n), full_truth(seed, 0, n, num_experts))
        try:
            h1.wait()
            wait_error = None
        except dc.SlotStillHeldError as exc:
            wait_error = str(exc)
        h0.release()
        h1.wait()
        for n in SPECS:
            assert same_bytes(h1.weights(n), full_truth(seed, 1, n, num_experts))
        # A handle released before its copies were ever submitted is cancelled, not written.
        h1.release()
        h2 = pf.prefetch(0)
        h3 = pf.prefetch(1)          # deferred behind h2
        h3.release()                 # cancelled
        h2.wait()
        still = same_bytes(h2.weights("w13"), full_truth(seed, 0, "w13", num_experts))
        h2.release()
        h4 = pf.prefetch(1)
        h4.wait()
        assert same_bytes(h4.weights("w2"), full_truth(seed, 1, "w2", num_experts))
        h4.release()
        cancelled_ok = still and not h3.is_submitted
    st.close()
    return {"deferred": deferred, "wait_error": wait_error, "cancelled_ok": cancelled_ok}


def default_depth(group, num_experts: int, seed: int):
    """Prefetcher(store) has two slots: a third prefetch waits for the first one's release."""
    st = build_store(group, num_experts, [0, 1, 2], seed)
    pf = dc.Prefetcher(st)
    hs = [pf.prefetch(l) for l in (0, 1, 2)]
    out = {"depth": pf.depth, "slots": [h.slot for h in hs], "submitted": [h.is_submitted for h in hs]}
    hs[0].wait()
    hs[0].release()
    out["submitted_after_release"] = hs[2].is_submitted
    for l, h in zip((1, 2), hs[1:]):
        h.wait()
        for n in SPECS:
            assert same_bytes(h.weights(n), full_truth(seed, l, n, num_experts)), (l, n)
        h.release()
    pf.close()
    st.close()
    return out


def custom_policy(group, num_experts: int, seed: int):
    """A policy registered in this process is usable as a Prefetcher schedule."""
    from dwdp_comm.planner import register_policy

    @register_policy("test_descending")
    def _descending(num_chunks, rank, group_size):  # sources in descending order, one after another
        out, t = {}, 0
        for s in sorted(num_chunks, reverse=True):
            out[s] = np.arange(t, t + num_chunks[s], dtype=np.int64)
            t += num_chunks[s]
        return out

    st = build_store(group, num_experts, [0], seed)
    with dc.Prefetcher(st, schedule="test_descending", chunk_nbytes=1024) as pf:
        h = pf.prefetch(0)
        h.wait()
        for n in SPECS:
            assert same_bytes(h.weights(n), full_truth(seed, 0, n, num_experts)), n
        h.release()
        (plan,) = pf.plan_cache.plans()
        remote = [s for s in plan.src_rank.tolist() if s != group.rank]
        out = {"policy": plan.policy, "sources": sorted(set(remote), key=remote.index)}
    st.close()
    return out


def engine_order(group, chunk: int):
    """The sim copy engine waits for its `after` events, then copies chunk by chunk in plan order;
    its event completes only when every byte landed. Needs a throttled engine (copy_bandwidth)."""
    from dwdp_comm.backends.sim import SimEvent
    from dwdp_comm.planner import CopyRange, make_plan

    impl, r, G = group.impl, group.rank, group.size
    per = 4 * chunk  # bytes read from each source

    def pattern(src_rank, start, n):  # never 0, differs per source
        return ((torch.arange(start, start + n) * 7 + src_rank * 53) % 251 + 1).to(torch.uint8)

    heap = impl.alloc_symmetric(G * per)
    heap.local.tensor(0, G * per).copy_(pattern(r, 0, G * per))
    group.barrier()
    ranges = [CopyRange(s, s * per, s * per, per) for s in range(G) if s != r]
    plan = make_plan(ranges, rank=r, group_size=G, policy="round_robin", chunk_nbytes=chunk)
    expect = [(do, n, pattern(s, so, n)) for _t, s, so, do, n in plan.copies()]
    dst = impl.alloc_buffer(G * per)
    out = dst.tensor()
    eng = impl.copy_engine(heap)
    import threading
    copy_thread = any(t.name == f"dwdp-sim-copy-r{r}" and t.is_alive() for t in threading.enumerate())
    gate = SimEvent()  # not complete: the job must not start
    done = eng.submit(plan, src_base=0, dst=dst, dst_base=0, after=[gate])
    time.sleep(0.3)
    gated = (not done.is_done, bool((out == 0).all()))
    gate.complete()
    states = []
    while True:
        fin = done.is_done
        states.append((fin, tuple(torch.equal(out[do:do + n], want) for do, n, want in expect)))
        if fin:
            break
        time.sleep(0.001)
    done.synchronize()
    eng.close()
    del out
    dst.close()
    heap.close()  # collective: waits until no peer reads this rank's heap
    landed = [l for _, l in states]
    return {"gated": gated, "copies": len(expect), "copy_thread": copy_thread,
            "prefix": all(list(l) == sorted(l, reverse=True) for l in landed),  # True...True False...False
            "final": states[-1][0] and all(states[-1][1]),
            "distinct": len(set(landed))}


def slow_copies(group, num_experts: int, seed: int):
    """With a throttled copy engine, prefetch returns before the copies finish (asynchrony)."""
    st = build_store(group, num_experts, [0], seed)
    with dc.Prefetcher(st, depth=1, chunk_nbytes=1024) as pf:
        t0 = time.perf_counter()
        h = pf.prefetch(0)
        t_issue = time.perf_counter() - t0
        done_at_issue = h.is_done
        h.wait()
        t_done = time.perf_counter() - t0
        ok = all(same_bytes(h.weights(n), full_truth(seed, 0, n, num_experts)) for n in SPECS)
        h.release()
    st.close()
    return {"t_issue": t_issue, "t_done": t_done, "done_at_issue": done_at_issue, "ok": ok}


class _HeldEngine:
    """Wraps a copy engine: every job's event stays incomplete until ``close()``, as with a
    ``sync`` engine whose copy streams wait for a peer's job that never comes (released only by
    the collective close)."""

    def __init__(self, inner):
        self.inner, self.released = inner, threading.Event()

    def __getattr__(self, name):  # collective, abort, ...: the wrapped engine's
        return getattr(self.inner, name)

    def submit(self, plan, **kw):
        return _HeldEvent(self.inner.submit(plan, **kw), self.released)

    def close(self):
        self.released.set()
        self.inner.close()


class _HeldEvent:
    def __init__(self, ev, released):
        self.ev, self.released = ev, released

    def wait(self, *, stream=None):
        self.ev.wait(stream=stream)

    @property
    def is_done(self):
        return self.released.is_set() and self.ev.is_done

    def synchronize(self):
        if not self.released.wait(5.0):
            raise RuntimeError("waited on a copy before the copy engine was closed (would hang)")
        self.ev.synchronize()


def close_releases_engine_first(group, num_experts: int, seed: int):
    """Prefetcher.close() closes the engine before it waits on the handles' events."""
    st = build_store(group, num_experts, [0, 1], seed)
    make = group.impl.copy_engine
    group.impl.copy_engine = lambda heap, **o: _HeldEngine(make(heap, **o))
    pf = dc.Prefetcher(st, depth=2)
    group.impl.copy_engine = make
    h = pf.prefetch(0)
    error = None
    try:
        pf.close()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    closed_twice = _error(pf.close)
    st.close()
    return {"error": error, "released": pf.engine.released.is_set(), "handle_done": h.is_done,
            "closed_twice": closed_twice}


# ---- errors ---------------------------------------------------------------------------------------
def _error(fn) -> tuple[str, str] | None:
    try:
        fn()
    except dc.DwdpError as exc:
        return type(exc).__name__, str(exc)
    return None


def usage_errors(group, seed: int):
    """Every documented misuse raises a clear DwdpError (collected per case)."""
    out = {}
    lay = dc.ExpertLayout(6, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    shard = torch.zeros(lay.num_local_experts, 4, 1024)
    st.register(0, "w", shard)
    out["duplicate"] = _error(lambda: st.register(0, "w", shard))
    out["bad_layer"] = _error(lambda: st.register(-1, "w", shard))
    out["bad_name"] = _error(lambda: st.register(0, "", shard))
    out["bad_shard"] = _error(lambda: st.register(0, "x", 3.0))
    out["scalar_shard"] = _error(lambda: st.register(0, "x", torch.tensor(1.0)))
    out["prefetcher_before_commit"] = _error(lambda: dc.Prefetcher(st))
    st.commit()
    out["register_after_commit"] = _error(lambda: st.register(1, "w", shard))
    out["commit_twice"] = _error(st.commit)
    out["depth0"] = _error(lambda: dc.Prefetcher(st, depth=0))
    out["chunk0"] = _error(lambda: dc.Prefetcher(st, chunk_nbytes=0))
    out["chunk_neg"] = _error(lambda: dc.Prefetcher(st, chunk_nbytes=-5))
    out["schedule"] = _error(lambda: dc.Prefetcher(st, schedule="fastest"))
    pf = dc.Prefetcher(st, depth=1)
    out["unregistered_layer"] = _error(lambda: pf.prefetch(7))
    out["bad_experts"] = _error(lambda: pf.prefetch(0, experts=[99]))
    h = pf.prefetch(0)
    out["weights_before_wait"] = _error(lambda: h.weights("w"))
    h.wait()
    out["unregistered_name"] = _error(lambda: h.weights("nope"))
    h.release()
    out["weights_after_release"] = _error(lambda: h.weights("w"))
    out["release_twice"] = _error(h.release)
    pf.close()
    out["prefetch_after_close"] = _error(lambda: pf.prefetch(0))
    out["close_twice"] = _error(pf.close)
    st.close()
    out["store_after_close"] = _error(lambda: st.local(0, "w"))
    out["store_close_twice"] = _error(st.close)
    out["prefetcher_on_closed_store"] = _error(lambda: dc.Prefetcher(st))
    group.close()
    out["group_close_twice"] = _error(group.close)
    out["store_on_closed_group"] = _error(lambda: dc.WeightStore(group, lay))
    return out


def mismatched_commit(group, case: str):
    """Ranks register inconsistently; every rank must raise the same CollectiveMismatchError."""
    lay = dc.ExpertLayout(7, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    n = lay.num_local_experts
    last = group.rank == group.size - 1
    if case == "dtype":
        st.register(0, "w", torch.zeros(n, 3, dtype=torch.float16 if last else torch.float32))
    elif case == "shape":
        st.register(0, "w", torch.zeros(n, 4 if last else 3))
    elif case == "missing_name":
        st.register(0, "w", torch.zeros(n, 3))
        if not last:
            st.register(0, "scale", torch.zeros(n, 1))
    elif case == "missing_layer":
        st.register(0, "w", torch.zeros(n, 3))
        if last:
            st.register(5, "w", torch.zeros(n, 3))
    elif case == "shard_size":
        st.register(0, "w", torch.zeros(n + (1 if last else 0), 3))
    elif case == "nothing":
        pass
    try:
        st.commit()
    except dc.CollectiveMismatchError as exc:
        return str(exc)
    return None


# ---- init and launch -------------------------------------------------------------------------------
def init_report(backend: str):
    """Call dwdp_comm.init (torch.distributed is up) and report what happened."""
    try:
        g = dc.init(backend)
    except dc.DwdpError as exc:
        return ("error", type(exc).__name__, str(exc))
    out = ("ok", g.backend, g.backend_reason, str(g.device), g.rank, g.size)
    g.close()
    return out


def init_logged(backend: str):
    """dwdp_comm.init's log records on the 'dwdp_comm' logger (auto says which backend it took)."""
    import logging
    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("dwdp_comm")
    log.setLevel(logging.INFO)
    log.addHandler(_Keep())
    g = dc.init(backend)
    out = (g.backend, records)
    g.close()
    return out


def default_and_sub_group(num_experts: int, seed: int):
    """group=None is the default (world) group; a sub-group gives its own ranks and runs a pipeline."""
    import torch.distributed as dist
    g = dc.init("sim")
    whole = (g.rank, g.size)
    g.close()
    sub = dist.new_group([1, 2])  # every rank calls new_group
    facts = checked = None
    if dist.get_rank() in (1, 2):
        g = dc.init("sim", group=sub)
        facts = (g.rank, g.size)
        checked = pipeline(g, num_experts, 3, 2, "round_robin", 3000, seed)["checked"]
        g.close()
    dist.barrier()
    return whole, facts, checked


MARK = "module"  # the parent changes it; a forked child would see the change, a spawned one does not


def launch_facts(group):
    import multiprocessing
    import torch.distributed as dist
    return group.rank, group.size, dist.get_backend(), MARK, multiprocessing.current_process().name


def rank_and_size(group):
    return group.rank, group.size


def raise_on_rank(group, bad_rank: int, others: str = "barrier"):
    if group.rank == bad_rank:
        raise ValueError(f"boom on rank {group.rank}")
    if others == "barrier":
        group.barrier()  # the others wait for the bad rank, which never comes
    else:
        time.sleep(3600)  # blocked in something that never notices the bad rank: launch must kill it
    return "unreachable"


def die_on_rank(group, bad_rank: int):
    import os
    if group.rank == bad_rank:
        os._exit(3)
    group.barrier()
    return "unreachable"


def sleep_forever(group):
    time.sleep(3600)


# ---- fault cases (tests/cpu/test_faults.py, perf/fault_times.py) ---------------------------------------
def _err(exc) -> dict:
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
        out["error"] = _err(exc)
    out["time_to_error_s"] = time.perf_counter() - t0
    out["closed"] = st.closed
    out["use_after"] = _error(lambda: st.local(0, "w"))
    # The group still works: a good store commits and prefetches every byte.
    out["after_ok"] = pipeline(group, 7, 2, 1, "round_robin", 1000, seed)["checked"] > 0
    return out


def views_after_close(group, num_experts: int, seed: int):
    """weights(), weight_segments() and local() tensors kept past close() stay readable (gather-mode
    names of odd sizes and composite names alike): no crash."""
    st = build_store(group, num_experts, [0], seed)
    pf = dc.Prefetcher(st, depth=1, chunk_nbytes=700)
    h = pf.prefetch(0)
    h.wait()
    kept = {n: (h.weights(n), h.weight_segments(n), st.local(0, n)) for n in SPECS}
    want = {n: full_truth(seed, 0, n, num_experts) for n in SPECS}
    h.release()
    pf.close()
    st.close()
    lay = dc.ExpertLayout(num_experts, group.size, group.rank)
    ok = {}
    for n, (w, segs, loc) in kept.items():  # the memory is still mapped: it holds the last bytes
        ok[n] = (same_bytes(w, want[n]) and all(same_bytes(t, want[n][s:s + t.shape[0]]) for s, t in segs)
                 and same_bytes(loc, want[n][lay.local_experts.start:lay.local_experts.stop]))
    return ok


def write_through_view(group, num_experts: int, seed: int):
    """Rank 0 writes into every row of its prefetched views (composite and gather names) and of its
    local(); no other rank, and no later prefetch, may see the change."""
    st = build_store(group, num_experts, [0], seed)
    pf = dc.Prefetcher(st, depth=1, chunk_nbytes=4096)
    modes = {n: st.slot_mode(0, n) for n in SPECS}
    h = pf.prefetch(0)
    h.wait()
    if group.rank == 0:
        for n in SPECS:
            h.weights(n).view(torch.uint8).bitwise_not_()
            for _, t in h.weight_segments(n):
                t.view(torch.uint8).add_(1)
            st.local(0, n).view(torch.uint8).bitwise_not_()
    h.release()
    group.barrier()
    h = pf.prefetch(0)
    h.wait()
    clean = {n: same_bytes(h.weights(n), full_truth(seed, 0, n, num_experts)) for n in SPECS}
    h.release()
    group.barrier()
    st.close()
    return {"modes": modes, "clean": clean}


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
        return dict(_err(exc), time_to_error_s=time.perf_counter() - t0)
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
        out = dict(_err(exc), time_to_error_s=time.perf_counter() - t0)
    except Exception as exc:  # a raw transport error: what the fix removes
        out = dict(type=f"raw {type(exc).__name__}", msg=str(exc), missing=None, ranks=[],
                   time_to_error_s=time.perf_counter() - t0)
    with open(os.path.join(report_dir, f"rank{group.rank}.json"), "w") as f:
        json.dump(out, f)
    time.sleep(30)  # stay until launch kills us (the dead rank is the root cause it reports)


def close_order_and_twice(group, seed: int):
    """close() twice, and the store before its prefetcher (or the other way round): no error."""
    out = {}
    st = build_store(group, 5, [0], seed)
    pf = dc.Prefetcher(st)
    pf.prefetch(0).wait()
    out["store_first"] = _error(lambda: (st.close(), pf.close(), pf.close(), st.close()))
    st = build_store(group, 5, [0], seed)
    pf = dc.Prefetcher(st)
    out["prefetcher_first"] = _error(lambda: (pf.close(), pf.close(), st.close(), st.close()))
    return out


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
        out["error"] = dict(_err(exc), time_to_error_s=time.perf_counter() - t0)
    return out


def pid_and_sleep(group, pid_dir: str):
    """Write this rank's pid, then sleep (the test kills the launching parent with SIGKILL)."""
    import os
    with open(os.path.join(pid_dir, f"rank{group.rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)


def torchrun_main(argv) -> int:
    """Entry point under torchrun (``python -m torch.distributed.run ... -m rankfns stuck``): rank 1
    is late by 8 s; rank 0's barrier (timeout 3 s) must name it."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    g = dc.init("sim", timeout=3)
    if dist.get_rank() == 1:
        time.sleep(8)
        code = 0
    else:
        t0 = time.perf_counter()
        try:
            g.barrier()
            print("RESULT no error", flush=True)
            code = 1
        except dc.DwdpError as exc:
            print(f"RESULT {type(exc).__name__} missing={getattr(exc, 'missing', None)} "
                  f"after {time.perf_counter() - t0:.1f} s: {exc}", flush=True)
            code = 0
    g.abort()
    return code


if __name__ == "__main__":
    import sys
    sys.exit(torchrun_main(sys.argv[1:]))


# ---- randomized integrity (tests/cpu/test_integrity.py) ------------------------------------------------
INTEGRITY_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
                    torch.float8_e5m2, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
                    torch.complex64]


def integrity_config(rng, G: int) -> dict:
    """One random config (the same on every rank: ``rng`` is seeded identically)."""
    E = G + rng.randrange(0, 3 * G + 4)  # uneven most of the time
    names = {}
    for k in range(rng.randrange(1, 4)):
        dtype = rng.choice(INTEGRITY_DTYPES)
        kind = rng.random()
        if kind < 0.15:
            shape = (rng.randrange(0, 3), 0)            # zero-size experts
        elif kind < 0.35:
            shape = (4096 // dtype.itemsize,)           # one page: composite mode on sim
        else:
            shape = tuple(rng.randrange(1, 9) for _ in range(rng.randrange(1, 3)))  # odd sizes
        names[f"t{k}"] = (shape, dtype)
    layers = sorted(rng.sample(range(8), rng.randrange(1, 4)))
    return {"E": E, "names": names, "layers": layers, "depth": rng.randrange(1, 4),
            "schedule": rng.choice(["round_robin", "rotated", "naive"]),
            "chunk": rng.choice([1, 3, 7, 64, 1000, 4096, 1 << 20]), "rounds": rng.randrange(1, 4)}


def _integrity_tensor(seed: int, layer: int, name: str, expert: int, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + layer * 10_007 + zlib.crc32(name.encode()) * 31 + expert)
                                      % (2**63))
    n = int(np.prod(shape)) * dtype.itemsize
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).view(dtype).view(shape)


def integrity(group, seed: int, num_configs: int):
    """Run ``num_configs`` random configs in this one launch; compare every delivered byte of every
    present expert (subset prefetches included). Returns per-config counts and any mismatch."""
    import random
    rng = random.Random(seed * 7919 + group.size)
    out = {"configs": 0, "bytes": 0, "wrong": [], "modes": set()}
    for c in range(num_configs):
        cfg = integrity_config(rng, group.size)
        lay = dc.ExpertLayout(cfg["E"], group.size, group.rank)
        st = dc.WeightStore(group, lay)
        for l in cfg["layers"]:
            for n, (shape, dtype) in cfg["names"].items():
                st.register(l, n, torch.stack([_integrity_tensor(seed + c, l, n, e, shape, dtype)
                                               for e in lay.local_experts]))
        st.commit()
        out["modes"] |= {st.slot_mode(cfg["layers"][0], n) for n in cfg["names"]}
        pf = dc.Prefetcher(st, depth=cfg["depth"], schedule=cfg["schedule"], chunk_nbytes=cfg["chunk"])
        todo = [l for _ in range(cfg["rounds"]) for l in cfg["layers"]]
        pending = []
        for l in todo:
            subset = None
            if rng.random() < 0.4:  # a subset prefetch: the same draw on every rank is not needed
                subset = sorted(random.Random(seed + c + l + group.rank).sample(range(cfg["E"]),
                                                                                 rng.randrange(0, cfg["E"] + 1)))
            pending.append((l, subset, pf.prefetch(l, experts=subset)))
            if len(pending) == cfg["depth"]:
                _check_handle(out, c, seed, cfg, lay, *pending.pop(0))
        while pending:
            _check_handle(out, c, seed, cfg, lay, *pending.pop(0))
        st.close()
        out["configs"] += 1
    out["modes"] = sorted(out["modes"])
    return out


def _check_handle(out, c, seed, cfg, lay, layer, subset, h):
    h.wait()
    present = h.present_experts
    for n, (shape, dtype) in cfg["names"].items():
        w = h.weights(n, experts=present)
        for e in present:
            want = _integrity_tensor(seed + c, layer, n, e, shape, dtype)
            if not same_bytes(w[e], want):
                out["wrong"].append((c, layer, n, e))
            out["bytes"] += want.numel() * want.element_size()
        if len(present) == cfg["E"]:
            for start, t in h.weight_segments(n):
                for i in range(t.shape[0]):
                    if not same_bytes(t[i], _integrity_tensor(seed + c, layer, n, start + i, shape, dtype)):
                        out["wrong"].append((c, layer, n, start + i, "segment"))
    h.release()


# ---- placement: the store says which view a slot gives ---------------------------------------------
def slot_views(group, num_experts: int, seed: int, specs=SPECS):
    """WeightStore.slot_view agrees with the placement and with what the prefetcher hands out; the
    prefetcher's public accessors (engine, engine_api, slot_ptr) answer on sim. Any backend (the
    accessor checks are sim's). Returns each name's slot mode."""
    st = build_store(group, num_experts, [0], seed, specs)
    lay, out = st.layout, {}
    with dc.Prefetcher(st, depth=1) as pf:
        h = pf.prefetch(0)
        h.wait()
        for n, (shape, dtype) in specs.items():
            v = st.slot_view(0, n)
            e = st.entries(0)[n]
            nb = e.spec.expert_nbytes
            assert v.mode == st.slot_mode(0, n) and v.num_experts == num_experts and v.spec == st.spec(0, n)
            assert [p.first for p in v.pieces] == sorted(p.first for p in v.pieces)
            assert sum(p.count for p in v.pieces) == num_experts and all(p.nbytes == p.count * nb for p in v.pieces)
            if v.mode == "gather":
                assert [(p.source, p.offset) for p in v.pieces] == [("slot", e.slot_offset)]
            else:
                heap = [p for p in v.pieces if p.source == "heap"]
                assert [(p.first, p.count, p.offset) for p in heap] == [
                    (lay.first_expert(lay.rank), lay.num_local_experts, e.heap_offset)]
            # The view's pieces are the handle's segments, and typed() is the registered dtype and shape.
            assert [s for s, _ in h.weight_segments(n)] == [p.first for p in v.pieces]
            assert v.typed(torch.zeros(num_experts * nb, dtype=torch.uint8)).shape == (num_experts, *shape)
            assert same_bytes(h.weights(n).cpu(), full_truth(seed, 0, n, num_experts, specs))
            out[n] = v.mode
        h.release()
        if group.backend != "sim":
            st.close()
            return out
        assert pf.engine is not None and pf.engine_api is None  # sim's engine has no copy-API choice
        for bad in (-1, 1, True):
            try:
                pf.slot_ptr(bad)
                raise AssertionError(f"slot_ptr({bad!r}) did not raise")
            except dc.InvalidArgumentError as exc:
                assert str(exc).startswith("index: "), exc
        try:
            pf.slot_ptr(0)
            raise AssertionError("slot_ptr on sim did not raise")
        except dc.InvalidArgumentError as exc:
            assert "no device address" in str(exc), exc
    try:
        st.slot_view(0, "nope")
        raise AssertionError("slot_view of an unknown name did not raise")
    except dc.InvalidArgumentError as exc:
        assert str(exc).startswith("name: "), exc
    st.close()
    return out


# ---- launch's reports (tests/cpu/test_init.py) ---------------------------------------------------------
def finish_or_sleep(group, sleepers):
    """Ranks in ``sleepers`` never finish; the others return at once."""
    if group.rank in sleepers:
        time.sleep(3600)
    return group.rank


def fail_some(group, first: int, later: int):
    """Rank ``first`` raises at once, rank ``later`` 0.5 s after, the others never finish."""
    if group.rank == first:
        raise ValueError(f"first failure on rank {group.rank}")
    if group.rank == later:
        time.sleep(0.5)
        raise RuntimeError(f"later failure on rank {group.rank}")
    time.sleep(3600)


def board_report(store_kind: str, stuck_rank: int, stuck_s: float):
    """dwdp_comm.init with an explicit store (``"tcp"``: a TCPStore rank 0 serves) or none
    (``"none"``, and no MASTER_ADDR); rank ``stuck_rank`` is late, the others report their barrier's
    error and whether the board's keys reached the store."""
    import os
    import torch.distributed as dist
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    store, server = None, None
    if store_kind == "tcp":
        port = [None]
        if dist.get_rank() == 0:
            server = dist.TCPStore("127.0.0.1", 0, dist.get_world_size(), is_master=True, wait_for_workers=False)
            port = [server.port]
        dist.broadcast_object_list(port, 0)
        store = server or dist.TCPStore("127.0.0.1", port[0], is_master=False)
    g = dc.init("sim", timeout=2, store=store)
    out = None
    if g.rank == stuck_rank:
        time.sleep(stuck_s)
    else:
        try:
            g.barrier()
        except dc.DwdpError as exc:
            out = _err(exc)
        if store is not None:
            out["board_keys"] = store.num_keys()
    dist.barrier()  # rank 0 serves the TCPStore: it must not exit before the others have read it
    g.abort()
    return out


def store_type_error():
    try:
        dc.init("sim", store="tcp://localhost:1")
    except dc.DwdpError as exc:
        return _err(exc)
    return None


# ---- nvshmem's local release, with a fake nvshmem4py (tests/cpu/test_faults.py) -------------------------
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
            out["error"] = dict(_err(exc), time_to_error_s=time.perf_counter() - t0)
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
        err = dict(_err(exc), time_to_error_s=time.perf_counter() - t0)
    return {"error": err, "calls": list(fake.calls)}


def group_abort_uses_backend_abort(group):
    """Group.abort() releases the backend with its local abort(), never its (maybe collective) close()."""
    calls = []

    class Recorder:
        def __init__(self, impl):
            self.impl = impl

        def abort(self):
            calls.append("abort")
            self.impl.abort()

        def close(self):
            calls.append("close")
            self.impl.close()

    group.impl = Recorder(group.impl)
    group.abort()
    return calls


def heap_write_detection(group, writer: int, seed: int):
    """Writes that reach a rank's heap (as a write through a GPU composite view does) are found by
    dwdp_comm.testing.check_local_unchanged on every rank; writes through sim's copy-on-write views
    are not writes to the heap and pass the check."""
    st = build_store(group, 7, [0, 1], seed)
    digest = dc.testing.local_digest(st)
    out = {"keys": sorted(map(list, digest))}
    pf = dc.Prefetcher(st, depth=1)
    h = pf.prefetch(0)
    h.wait()
    if group.rank == writer:  # through the views: copy-on-write on sim
        for n in SPECS:
            h.weights(n).view(torch.uint8).bitwise_not_()
            st.local(0, n).view(torch.uint8).bitwise_not_()
    h.release()
    out["after_views"] = _error(lambda: dc.testing.check_local_unchanged(st, digest))
    if group.rank == writer:  # straight into the heap: what a write through a GPU composite view does
        e = st.entries(1)["w2"]
        st.heap.local.tensor(e.heap_offset, 1).bitwise_not_()
    t0 = time.perf_counter()
    try:
        dc.testing.check_local_unchanged(st, digest)
        out["after_heap_write"] = None
    except dc.DwdpError as exc:
        out["after_heap_write"] = dict(_err(exc), time_to_error_s=time.perf_counter() - t0)
    out["bad_digest"] = _error(lambda: dc.testing.check_local_unchanged(st, {"not": "a digest"}))
    pf.close()
    st.close()
    return out


# ---- stream is keyword-only everywhere, and accepted (ignored) on sim --------------------------------
def stream_keyword(group, num_experts: int, seed: int):
    """The GPU idiom (``wait(stream=s)``, ``release(stream=s)``, ``record_event(stream=s)``,
    ``prefetch(..., stream=s)``) runs unchanged on sim; ``stream`` given positionally is a TypeError."""
    st = build_store(group, num_experts, [0, 1], seed)
    s = object()  # stands for a torch / CuPy stream: sim never looks at it
    positional = []
    with dc.Prefetcher(st, depth=1) as pf:
        assert pf.capture_id(stream=s) is None
        h = pf.prefetch(0, stream=s)
        h.wait(stream=s)
        assert same_bytes(h.weights("w13"), full_truth(seed, 0, "w13", num_experts))
        nxt = pf.prefetch(1, stream=s)  # deferred until the release below frees the slot
        h.release(stream=s)
        for call in (lambda: nxt.wait(s), lambda: nxt.release(s), lambda: group.impl.record_event(s),
                     lambda: group.impl.capture_id(s), lambda: pf.capture_id(s)):
            try:
                call()
                positional.append(None)
            except TypeError as exc:
                positional.append(str(exc))
        nxt.wait(stream=s)
        assert same_bytes(nxt.weights("w2"), full_truth(seed, 1, "w2", num_experts))
        ev = group.impl.record_event(stream=s)
        ev.wait(stream=s)
        nxt.release(stream=s)
    st.close()
    return {"positional": positional, "done": ev.is_done}


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
        out = dict(_err(exc), time_to_error_s=time.perf_counter() - t0)
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
    st = build_store(group, 5, [0], seed)
    if group.rank == bad_rank:
        make = group.impl.copy_engine
        group.impl.copy_engine = lambda heap, **o: _FailingEngine(make(heap, **o))
    pf = dc.Prefetcher(st, depth=1)
    pf.prefetch(0)  # never waited: the failure surfaces in close()
    t0 = time.perf_counter()
    try:
        st.close()
    except dc.DwdpError as exc:
        return dict(_err(exc), closed=st.closed, time_to_error_s=time.perf_counter() - t0)
    return None
