"""Rank functions of the telemetry tests (module level, so spawned ranks can unpickle them).

Each returns plain data (Telemetry objects pickle) plus the facts the test checks them against:
the store's layout and specs, the prefetcher's byte counter, the ids passed as routing.
"""

from __future__ import annotations

import torch

import dwdp_comm as dc
from dwdp_comm.moe import DwdpPipeline
from tests.helpers import stores

LAYERS = [2, 0, 5]  # forward order, neither sorted nor consecutive


def _expected_source_bytes(st: dc.WeightStore, layer: int) -> dict[int, int]:
    """Bytes one full prefetch of ``layer`` reads from each source: every expert of a peer for every
    name; this rank's own experts for gather-mode names (copied into the slot too)."""
    lay = st.layout
    out = {}
    for s in range(lay.group_size):
        names = st.names(layer) if s != lay.rank else [n for n in st.names(layer) if st.slot_mode(layer, n) == "gather"]
        n = sum(st.spec(layer, name).expert_nbytes * lay.num_experts_of(s) for name in names)
        if n:
            out[s] = n
    return out


def _forwards(pipe, layers, num_experts: int, forwards: int, gen, routing: list):
    for _ in range(forwards):
        pipe.begin()
        for l in layers:
            ids = torch.randint(-1, num_experts + 1, (int(torch.randint(1, 9, (1,), generator=gen)), 3), generator=gen)
            routing.append((l, ids.tolist()))  # plain lists: tensors do not travel back from spawned ranks
            pipe.release(pipe.acquire(l, expert_ids=ids))


def fields(group, num_experts: int, seed: int, slow_bw: float | None = None):
    """Two forwards with telemetry and routing on. With ``slow_bw``, the copies from rank
    ``(rank + 1) % G`` run at ``slow_bw`` bytes/s (sim engine option ``source_bandwidth``)."""
    st = stores.build_store(group, num_experts, LAYERS, seed)
    slow = (group.rank + 1) % group.size
    opts = {"source_bandwidth": {slow: slow_bw}} if slow_bw else None
    pf = dc.Prefetcher(st, depth=2, chunk_nbytes=4096, engine_options=opts)
    pipe = DwdpPipeline(pf, LAYERS)
    gen = torch.Generator().manual_seed(seed + group.rank)
    routing = []
    before = pf.nbytes_prefetched
    with pipe.recording(routing=True):
        _forwards(pipe, LAYERS, num_experts, 2, gen, routing)
        inside = pipe.telemetry_enabled
    tel = pipe.telemetry()
    # Records not released yet (the next forward's first layers, in flight) come later: release them.
    pipe.close()
    late = pipe.telemetry()
    out = {"tel": tel, "late": late, "expected": {l: _expected_source_bytes(st, l) for l in LAYERS},
           "nbytes_prefetched": pf.nbytes_prefetched - before, "routing_ids": routing, "inside": inside,
           "after": pipe.telemetry_enabled, "slow": slow, "modes": {n: st.slot_mode(LAYERS[0], n) for n in stores.SPECS}}
    pf.close()
    st.close()
    return out


class _Spy:
    """Wraps a copy engine and counts what submit() was given."""

    def __init__(self, inner, kwargs):
        self.inner, self.kwargs = inner, kwargs

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def submit(self, plan, **kw):
        self.kwargs.append(sorted(kw))
        return self.inner.submit(plan, **kw)

    def close(self):
        self.inner.close()


def off_and_toggles(group, num_experts: int, seed: int):
    """Telemetry never enabled: no timing asked of the engine, no clock used, no records; then
    enable / disable / recording() / max_records / cancelled prefetches / bad arguments."""
    st = stores.build_store(group, num_experts, LAYERS, seed)
    impl = group.impl
    kwargs, timers = [], []
    make, timer = impl.copy_engine, impl.timer
    impl.copy_engine = lambda heap, **o: _Spy(make(heap, **o), kwargs)
    impl.timer = lambda: timers.append(1) or timer()
    pf = dc.Prefetcher(st, depth=2, chunk_nbytes=4096)
    pipe = DwdpPipeline(pf, LAYERS)
    gen = torch.Generator().manual_seed(seed)
    _forwards(pipe, LAYERS, num_experts, 2, gen, [])
    off = pipe.telemetry()
    out = {"off_records": len(off.prefetches), "off_routing": off.routing, "off_kwargs": list(kwargs),
           "off_timer_calls": len(timers), "off_enabled": pipe.telemetry_enabled, "off_timed": off.timed}
    kwargs.clear()
    pipe.enable_telemetry()  # no routing
    _forwards(pipe, LAYERS, num_experts, 1, gen, [])
    on_kwargs = list(kwargs)
    pipe.disable_telemetry()
    kwargs.clear()
    _forwards(pipe, LAYERS, num_experts, 1, gen, [])
    pipe.close()
    tel = pipe.telemetry(reset=True)
    out.update(on_kwargs=on_kwargs, disabled_kwargs=list(kwargs), on_layers=[r.layer for r in tel.prefetches],
               on_routing=tel.routing, after_reset=len(pipe.telemetry().prefetches))
    # max_records: only the newest are kept, the others counted
    pipe.enable_telemetry(max_records=2)
    _forwards(pipe, LAYERS, num_experts, 2, gen, [])
    pipe.close()
    capped = pipe.telemetry(reset=True)
    out.update(capped=[r.seq for r in capped.prefetches], dropped=capped.dropped)
    pipe.disable_telemetry()
    # a prefetch released before it was submitted copied nothing: counted as cancelled, no record
    with pf.recording():
        h0, h1, h2 = pf.prefetch(LAYERS[0]), pf.prefetch(LAYERS[1]), pf.prefetch(LAYERS[2])  # h2 waits for slot 0
        h2.release()
        h0.wait()
        h0.release()
        h1.release()
    cancel = pf.telemetry(reset=True)
    out.update(cancelled=cancel.cancelled, cancel_layers=[r.layer for r in cancel.prefetches],
               cancel_waited=[r.exposed_wait_s is not None for r in cancel.prefetches])
    errors = []
    for bad in (0, -1, True, 2.5):
        try:
            pf.enable_telemetry(max_records=bad)
        except (dc.InvalidArgumentError, dc.InvalidTypeError) as exc:
            errors.append((type(exc).__name__, str(exc)))
    out["errors"] = errors
    try:
        impl.copy_engine = make
        make(st.heap, source_bandwidth={group.size: 1.0})
    except dc.InvalidArgumentError as exc:
        out["bw_error"] = str(exc)
    pf.close()
    st.close()
    return out


# ---- GPU backends ------------------------------------------------------------------------------------
def gpu_pipeline(group, num_experts: int, seed: int, engine_options: dict):
    """Two forwards of a pipeline on a GPU backend with telemetry and routing on; each layer's
    "compute" is a matmul on the current stream, so the release comes after the wait."""
    from tests.helpers import gpu_rankfns
    st = gpu_rankfns.build_store(group, num_experts, LAYERS, seed)
    pf = dc.Prefetcher(st, depth=2, chunk_nbytes=1 << 20, engine_options=engine_options)
    pipe = DwdpPipeline(pf, LAYERS)
    gen = torch.Generator().manual_seed(seed + group.rank)
    routing = []
    a = torch.randn(512, 512, device=group.device)
    expected = {}
    for l in LAYERS:
        expected[l] = _expected_source_bytes(st, l)
    with pipe.recording(routing=True):
        for _ in range(2):
            pipe.begin()
            for l in LAYERS:
                ids = torch.randint(-1, num_experts + 1, (16, 4), generator=gen)
                routing.append((l, ids.tolist()))
                h = pipe.acquire(l, expert_ids=ids.to(group.device))
                for _ in range(8):
                    a = torch.tanh(a @ a)
                pipe.release(h)
    pipe.close()
    tel = pipe.telemetry()
    out = {"tel": tel, "expected": expected, "routing_ids": routing, "nbytes_prefetched": pf.nbytes_prefetched,
           "api": pf.engine_api}
    pf.close()
    st.close()
    return out


def gpu_held_copies(group, num_experts: int, seed: int):
    """A prefetch whose copies are held back by a sleep kernel on a side stream (prefetch(...,
    stream=side)) against one whose copies finished before the wait: the exposed wait of the first
    covers the sleep, the second's is small."""
    from tests.helpers import gpu_rankfns
    st = gpu_rankfns.build_store(group, num_experts, [0, 1], seed)
    pf = dc.Prefetcher(st, depth=2, chunk_nbytes=1 << 20, telemetry=True)
    side = torch.cuda.Stream(device=group.device)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    group.barrier()
    h0 = pf.prefetch(0)
    h0.synchronize()  # its copies are done before the consumer reaches the wait
    h0.wait()
    h0.release()
    with torch.cuda.stream(side):
        e0.record(side)
        torch.cuda._sleep(50_000_000)  # ~25 ms at ~2 GHz
        e1.record(side)
    h1 = pf.prefetch(1, stream=side)  # copies start after the sleep
    h1.wait()
    h1.release()
    torch.cuda.synchronize()
    tel = pf.telemetry()
    out = {"tel": tel, "sleep_s": e0.elapsed_time(e1) / 1e3}
    pf.close()
    st.close()
    return out
