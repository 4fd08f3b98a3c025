"""Rank functions of the prefetch pipeline on sim (tests/cpu/test_sim_pipeline.py,
test_placement.py, test_stream_keyword.py; slot_views also on cuda_ipc): every byte checked
against :mod:`tests.helpers.stores`' ground truth."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

import dwdp_comm as dc
from tests.helpers.stores import SPECS, build_store, error_of, full_truth, same_bytes


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
    closed_twice = error_of(pf.close)
    st.close()
    return {"error": error, "released": pf.engine.released.is_set(), "handle_done": h.is_done,
            "closed_twice": closed_twice}


# ---- placement: the store says which view a slot gives -------------------------------------------
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
            e = st.placement(0, n)
            nb = e.spec.expert_nbytes
            assert v.mode == e.mode == st.slot_mode(0, n) and v.num_experts == e.num_experts == num_experts
            assert v.spec == e.spec == st.spec(0, n) and e.local_experts == lay.local_experts
            assert [p.first for p in v.pieces] == sorted(p.first for p in v.pieces)
            assert sum(p.count for p in v.pieces) == num_experts and all(p.nbytes == p.count * nb for p in v.pieces)
            if v.mode == "gather":
                assert [(p.source, p.offset) for p in v.pieces] == [("slot", e.slot_offset)]
            else:
                heap = [p for p in v.pieces if p.source == "heap"]
                assert [(p.first, p.count, p.offset) for p in heap] == [
                    (lay.first_expert(lay.rank), lay.num_local_experts, e.heap_offset)]
                for x in lay.local_experts:  # not in the slot: slot_row refuses them
                    assert error_of(lambda: e.slot_row(x))[0] == "InvalidArgumentError"
            # Each slot piece holds its experts at the rows slot_row gives.
            for p in v.pieces:
                if p.source == "slot":
                    assert all(p.offset + (x - p.first) * nb == e.slot_offset + e.slot_row(x) * nb
                               for x in range(p.first, p.first + p.count))
            assert error_of(lambda: e.slot_row(num_experts))[0] == "InvalidArgumentError"
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
        for bad, err in ((-1, dc.InvalidArgumentError), (1, dc.InvalidArgumentError), (True, dc.InvalidTypeError)):
            try:
                pf.slot_ptr(bad)
                raise AssertionError(f"slot_ptr({bad!r}) did not raise")
            except err as exc:
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


# ---- stream is keyword-only everywhere, and accepted (ignored) on sim ----------------------------
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
