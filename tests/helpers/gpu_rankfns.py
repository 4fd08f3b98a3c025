"""Per-rank functions of the multi-GPU tests (module level, so spawned ranks can unpickle them).

Ground truth: every expert's bytes come from a CPU generator seeded by (run seed, layer, name,
expert), so every rank can rebuild any layer's whole ``[num_experts, ...]`` tensor and compare it
byte for byte with what it prefetched. Tensors are compared as raw bytes (NaN patterns included).
"""

from __future__ import annotations

import time
import zlib

import numpy as np
import torch

import dwdp_comm as dc

MiB = 1 << 20

# name -> (per-expert shape, dtype). "w13" is 2 MiB per expert, a multiple of the VMM granularity:
# cuda_ipc (VMM) serves it as a composite view; everything else goes through gather mode.
SPECS = {
    "w13": ((1024, 1024), torch.bfloat16),
    "w2": ((8, 12), torch.bfloat16),
    "w13_scale": ((5,), torch.float8_e4m3fn),
    "bias": ((3, 7), torch.float32),
}


def _seed(seed: int, layer: int, name: str, expert: int) -> int:
    return (seed * 1_000_003 + layer * 10_007 + zlib.crc32(name.encode()) * 31 + expert) % (2**63)


def expert_tensor(seed: int, layer: int, name: str, expert: int, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed(seed, layer, name, expert))
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8).view(dtype).view(shape)


def full_truth(seed, layer, name, num_experts, specs=SPECS) -> torch.Tensor:
    shape, dtype = specs[name]
    return torch.stack([expert_tensor(seed, layer, name, e, shape, dtype) for e in range(num_experts)])


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu(), b.detach().cpu()
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def build_store(group, num_experts: int, layers, seed: int, specs=SPECS, on_gpu=("w13",)) -> dc.WeightStore:
    """Register every (layer, name); names in ``on_gpu`` as CUDA tensors, the others from the CPU."""
    lay = dc.ExpertLayout(num_experts, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    for l in layers:
        for name, (shape, dtype) in specs.items():
            shard = torch.stack([expert_tensor(seed, l, name, e, shape, dtype) for e in lay.local_experts]) \
                if lay.num_local_experts else torch.empty(0, *shape, dtype=dtype)
            st.register(l, name, shard.to(group.device) if name in on_gpu else shard)
    st.commit()
    return st


def _backend_desc(group) -> dict:
    impl = group.impl
    return {"backend": group.backend, "mode": getattr(impl, "mode", None),
            "map_granularity": impl.map_granularity, "alloc_alignment": impl.alloc_alignment}


# ---- end-to-end pipeline -------------------------------------------------------------------------
def pipeline(group, num_experts: int, num_layers: int, depth: int, schedule: str, chunk_nbytes: int, seed: int,
             engine_options: dict):
    """A DWDP loop over more layers than slots, consumed on a side compute stream; every byte checked."""
    layers = list(range(0, 2 * num_layers, 2))  # non-consecutive layer ids
    st = build_store(group, num_experts, layers, seed)
    lay = st.layout
    modes = {n: st.slot_mode(layers[0], n) for n in SPECS}
    for n in SPECS:  # the heap holds exactly the registered shard
        truth = full_truth(seed, layers[0], n, num_experts)
        assert same_bytes(st.local(layers[0], n), truth[lay.local_experts.start:lay.local_experts.stop]), n
    pf = dc.Prefetcher(st, depth=depth, schedule=schedule, chunk_nbytes=chunk_nbytes, engine_options=engine_options)
    compute = torch.cuda.Stream()
    handles = {layers[i]: pf.prefetch(layers[i]) for i in range(min(depth, len(layers)))}
    checked, zero_copy = 0, None
    for i, l in enumerate(layers):
        h = handles.pop(l)
        h.wait(stream=compute)  # the compute stream waits; the host does not
        with torch.cuda.stream(compute):
            got = {n: h.weights(n).clone() for n in SPECS}
            segs = {n: [(s, t.clone()) for s, t in h.weight_segments(n)] for n in SPECS}
        # Issue the next prefetch before releasing, as a MoE layer does (deferred if same slot).
        if i + depth < len(layers):
            handles[layers[i + depth]] = pf.prefetch(layers[i + depth])
        h.release(stream=compute)
        compute.synchronize()
        for n in SPECS:
            truth = full_truth(seed, l, n, num_experts)
            assert same_bytes(got[n], truth), f"rank {group.rank}: layer {l} {n} differs"
            assert sum(t.shape[0] for _, t in segs[n]) == num_experts
            for start, t in segs[n]:
                assert same_bytes(t, truth[start:start + t.shape[0]]), f"layer {l} {n} segment {start}"
            checked += truth.numel() * truth.element_size()
    if modes["w13"] == "composite":  # same on every rank: the barriers below are collective
        h = pf.prefetch(layers[0])
        h.synchronize()
        group.barrier()  # no rank copies from any heap now: flipping a heap byte is safe
        if lay.num_local_experts:
            zero_copy = _composite_is_zero_copy(st, h, layers[0])
        group.barrier()
        h.release()
    out = {"modes": modes, "checked": checked, "remote": sum(st.remote_nbytes(l) for l in layers),
           "prefetched": pf.nbytes_prefetched, "api": pf.engine_api, "zero_copy": zero_copy,
           "plan_cache": (pf.plan_cache.hits, pf.plan_cache.misses), **_backend_desc(group)}
    st.close()
    return out


def _composite_is_zero_copy(st, h, layer: int) -> bool:
    """Flip a byte of the local shard in the heap: the composite view must show it (same memory)."""
    lay = st.layout
    first = lay.first_expert(lay.rank)
    h.wait()
    local = st.local(layer, "w13").view(torch.uint8).view(-1)
    view = h.weights("w13")[first].view(torch.uint8).view(-1)
    before = int(view[0].item())
    local[0] = (before + 1) % 256
    torch.cuda.synchronize()
    seen = int(view[0].item())
    local[0] = before
    torch.cuda.synchronize()
    return seen == (before + 1) % 256


# ---- the race: prefetch of l+2 into the slot a long kernel still reads ---------------------------
RACE_SPECS = {"w": ((1024, 1024), torch.bfloat16), "g": ((64, 33), torch.float16)}


def race(group, seed: int, sleep_cycles: int):
    """While a long kernel on the compute stream still has to read layer 0's slot, prefetch(2) (same
    slot) is issued and layer 0 released: its copies must wait for the kernel. The kernel's output
    must be layer 0's bytes, and the host must never have blocked."""
    num_experts = 3 * group.size + 1
    st = build_store(group, num_experts, [0, 1, 2, 3], seed, specs=RACE_SPECS, on_gpu=("w",))
    out = {"modes": {n: st.slot_mode(0, n) for n in RACE_SPECS}, **_backend_desc(group)}
    try:
        dc.Prefetcher(st, engine_options={"streamz": 2})
        out["option_error"] = None
    except dc.InvalidArgumentError as exc:
        out["option_error"] = str(exc)
    pf = dc.Prefetcher(st, depth=2, chunk_nbytes=1 * MiB)
    compute = torch.cuda.Stream()
    h0, h1 = pf.prefetch(0), pf.prefetch(1)
    h0.wait(stream=compute)
    kernel_done = torch.cuda.Event()
    with torch.cuda.stream(compute):
        torch.cuda._sleep(sleep_cycles)  # a long kernel ahead of the reads of slot 0
        got = {n: h0.weights(n).clone() for n in RACE_SPECS}
        kernel_done.record(compute)
    t0 = time.perf_counter()
    h2 = pf.prefetch(2)  # slot 0 again: deferred until h0 is released
    out["deferred"] = not h2.is_submitted
    h0.release(stream=compute)  # submits h2's copies now; they must wait for the release event
    out["host_issue_s"] = time.perf_counter() - t0
    out["submitted"] = h2.is_submitted
    out["kernel_still_running"] = not kernel_done.query()
    out["h2_done_early"] = h2.is_done
    h2.wait(stream=compute)
    with torch.cuda.stream(compute):
        got2 = {n: h2.weights(n).clone() for n in RACE_SPECS}
    compute.synchronize()
    out["read_layer0"] = all(same_bytes(got[n], full_truth(seed, 0, n, num_experts, RACE_SPECS)) for n in RACE_SPECS)
    out["read_layer2"] = all(same_bytes(got2[n], full_truth(seed, 2, n, num_experts, RACE_SPECS)) for n in RACE_SPECS)
    h1.wait(stream=compute)
    compute.synchronize()
    out["read_layer1"] = all(same_bytes(h1.weights(n), full_truth(seed, 1, n, num_experts, RACE_SPECS))
                             for n in RACE_SPECS)
    h1.release(stream=compute)
    h2.release(stream=compute)
    st.close()
    return out


# ---- CuPy-only user --------------------------------------------------------------------------------
CUPY_SPECS = {"w13": ((1024, 512), np.float32), "w2": ((6, 10), np.float16), "q": ((17,), np.uint8)}


def _np_expert(seed: int, layer: int, name: str, expert: int) -> np.ndarray:
    shape, dtype = CUPY_SPECS[name]
    rng = np.random.default_rng(_seed(seed, layer, name, expert))
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return rng.integers(0, 256, nbytes, dtype=np.uint8).view(dtype).reshape(shape)


def cupy_only(group, num_experts: int, seed: int):
    """Register CuPy shards, prefetch on a CuPy stream, read CuPy weights; no torch tensor in user code."""
    import cupy as cp
    from dwdp_comm.interop import cupy as dcp

    lay = dc.ExpertLayout(num_experts, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    layers = [0, 1, 2]
    for l in layers:
        for name in CUPY_SPECS:
            st.register(l, name, cp.asarray(np.stack([_np_expert(seed, l, name, e) for e in lay.local_experts])))
    st.commit()
    s = cp.cuda.Stream(non_blocking=True)
    results = {}
    with dc.Prefetcher(st, depth=2, chunk_nbytes=256 * 1024) as pf:
        handles = [pf.prefetch(layers[0], stream=s), pf.prefetch(layers[1], stream=s)]
        for i, l in enumerate(layers):
            h = handles[i]
            h.wait(stream=s)
            with s:
                got = {n: dcp.weights(h, n).copy() for n in CUPY_SPECS}
            if i + 2 < len(layers):
                handles.append(pf.prefetch(layers[i + 2], stream=s))
            h.release(stream=s)
            s.synchronize()
            for n in CUPY_SPECS:
                truth = np.stack([_np_expert(seed, l, n, e) for e in range(num_experts)])
                arr = cp.asnumpy(got[n])
                assert arr.dtype == truth.dtype and arr.shape == truth.shape, (n, arr.dtype, arr.shape)
                assert arr.tobytes() == truth.tobytes(), f"rank {group.rank}: layer {l} {n} differs"
            results[l] = True
        local = dcp.local(st, 0, "w13")
        assert isinstance(local, cp.ndarray) and local.shape[0] == lay.num_local_experts
    st.close()
    return {"layers": sorted(results), "type": "cupy.ndarray"}


# ---- errors -------------------------------------------------------------------------------------------
def open_failure(group):
    """A heap handle that cannot be opened on one rank raises the same clear error on every rank."""
    lay = dc.ExpertLayout(4, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    st.register(0, "w", torch.zeros(lay.num_local_experts, 64))
    try:
        st.commit()
    except dc.DwdpError as exc:
        return type(exc).__name__, str(exc)
    return None


# ---- a full exchange through the copy engine directly (sync / local lane) --------------------------
def _block(src_rank: int, seed: int, nbytes: int, device) -> torch.Tensor:
    """Rank ``src_rank``'s heap bytes: a cheap rank- and offset-dependent pattern, built on the GPU."""
    i = torch.arange(nbytes, dtype=torch.int64, device=device)
    return ((i * 2654435761 + (src_rank + 1) * 40503 + seed * 977) >> 7).remainder(251).to(torch.uint8)


def exchange(group, engines: list, nbytes: int, chunk_nbytes: int, jobs: int, seed: int,
             skew_cycles: int, policy: str = "round_robin"):
    """For each engine option dict of ``engines`` (in one launch): every rank pulls ``nbytes`` from
    every peer and copies its own block locally (gather mode, on the local lane), ``jobs`` times
    through ``impl.copy_engine(heap, **options)`` (collective with ``sync``). Job ``j`` of rank ``r``
    starts behind a sleep kernel of ``((r + j) mod G) * skew_cycles`` on a side stream (its
    ``after`` event), so ranks drift. The destination is poisoned before every job; every byte of
    every job is compared. Returns one dict per engine: wrong bytes, times and issue times per job."""
    from dwdp_comm.planner import CopyRange, make_plan
    impl, G, rank = group.impl, group.size, group.rank
    dev = group.device
    heap = impl.alloc_symmetric(nbytes)
    dst = impl.alloc_buffer(G * nbytes)
    heap.local.tensor(0, nbytes).copy_(_block(rank, seed, nbytes, dev))
    want = torch.cat([_block(s, seed, nbytes, dev) for s in range(G)])
    torch.cuda.synchronize()
    group.barrier()
    plan = make_plan([CopyRange(s, 0, s * nbytes, nbytes) for s in range(G)], rank=rank, group_size=G,
                     policy=policy, chunk_nbytes=chunk_nbytes)
    side = torch.cuda.Stream()
    results = []
    for options in engines:
        eng = impl.copy_engine(heap, **options)
        out = {"options": options, "api": eng.api, "bits": getattr(getattr(eng, "_flags", None), "bits", None),
               "wrong": [], "times_ms": [], "delays": [], "issue_ms": [], "slots": plan.num_slots}
        for j in range(jobs):
            torch.cuda.synchronize()
            group.barrier()
            delay = ((rank + j) % G) * skew_cycles
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(side):
                dst.tensor().fill_(0xA5)  # poison (ordered before the copies by the 'after' event)
                e0.record(side)
                if delay:
                    torch.cuda._sleep(delay)
            after = [impl.record_event(stream=side)]
            t0 = time.perf_counter()
            done = eng.submit(plan, src_base=0, dst=dst, dst_base=0, after=after)
            out["issue_ms"].append((time.perf_counter() - t0) * 1e3)
            done.wait(stream=side)
            e1.record(side)
            e1.synchronize()
            out["times_ms"].append(e0.elapsed_time(e1))
            out["delays"].append(delay)
            out["wrong"].append(int((dst.tensor() != want).sum().item()))
        out["jobs"] = eng.jobs
        eng.close()  # collective with sync
        results.append(out)
    torch.cuda.synchronize()
    group.barrier()
    dst.close()
    heap.close()
    return results


# ---- fault cases (tests/gpu/test_faults_gpu.py) -----------------------------------------------------
def _err(exc) -> dict:
    return {"type": type(exc).__name__, "msg": str(exc), "missing": getattr(exc, "missing", None),
            "ranks": sorted(getattr(exc, "ranks", {}) or {})}


def commit_local_failure(group, bad_rank: int, seed: int):
    """Rank ``bad_rank`` registers a meta shard (its device copy fails): every rank raises the same
    error naming it, no rank returns from commit(), and a new store still commits and prefetches."""
    lay = dc.ExpertLayout(5, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    shard = torch.randn(lay.num_local_experts, 1024, 1024, dtype=torch.bfloat16, device=group.device)
    if group.rank == bad_rank:
        shard = torch.empty(lay.num_local_experts, 1024, 1024, dtype=torch.bfloat16, device="meta")
    st.register(0, "w", shard)
    out = {"error": None}
    try:
        st.commit()
    except dc.DwdpError as exc:
        out["error"] = _err(exc)
    out["closed"] = st.closed
    st2 = build_store(group, 5, [0], seed)
    with dc.Prefetcher(st2, depth=1) as pf:
        h = pf.prefetch(0)
        h.wait()
        out["after_ok"] = all(same_bytes(h.weights(n), full_truth(seed, 0, n, 5)) for n in SPECS)
        h.release()
    st2.close()
    return out


def views_after_close(group, seed: int, engine: dict):
    """weights(), weight_segments() and local() tensors kept past close() stay valid device memory
    (the tensors own their allocations / composite mappings) and still hold the bytes."""
    st = build_store(group, 5, [0], seed)
    pf = dc.Prefetcher(st, depth=1, engine_options=engine)
    h = pf.prefetch(0)
    h.wait()
    kept = {n: (h.weights(n), h.weight_segments(n), st.local(0, n)) for n in SPECS}
    h.release()
    pf.close()
    st.close()
    torch.cuda.synchronize()
    lay = st.layout
    ok = {}
    for n, (w, segs, loc) in kept.items():
        want = full_truth(seed, 0, n, 5)
        ok[n] = (same_bytes(w, want) and all(same_bytes(t, want[s:s + t.shape[0]]) for s, t in segs)
                 and same_bytes(loc, want[lay.local_experts.start:lay.local_experts.stop]))
    del kept
    torch.cuda.synchronize()
    return ok


def stuck_rank(group, bad_rank: int, stuck_s: float):
    """Rank ``bad_rank`` is late (with a committed store whose heap peers map); the others' close()
    raises CollectiveTimeoutError naming it."""
    st = build_store(group, 5, [0], 1)
    if group.rank == bad_rank:
        time.sleep(stuck_s)
        st.abort()
        return None
    t0 = time.perf_counter()
    try:
        st.close()
    except dc.DwdpError as exc:
        return dict(_err(exc), time_to_error_s=time.perf_counter() - t0)
    return None


def dead_rank_in_commit(group, bad_rank: int, report_dir: str):
    """Rank ``bad_rank`` dies inside commit's heap step; survivors write what they raised."""
    import json
    import os
    lay = dc.ExpertLayout(5, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    st.register(0, "w", torch.randn(lay.num_local_experts, 1024, 1024, dtype=torch.bfloat16, device=group.device))
    if group.rank == bad_rank:
        impl, alloc = group.impl, group.impl.alloc_symmetric

        def dying_alloc(*a, **k):
            alloc(*a, **k)
            os._exit(3)
        impl.alloc_symmetric = dying_alloc
    t0 = time.perf_counter()
    try:
        st.commit()
        out = None
    except dc.DwdpError as exc:
        out = dict(_err(exc), time_to_error_s=time.perf_counter() - t0)
    except Exception as exc:
        out = dict(type=f"raw {type(exc).__name__}", msg=str(exc), missing=None, ranks=[])
    with open(os.path.join(report_dir, f"rank{group.rank}.json"), "w") as f:
        json.dump(out, f)
    time.sleep(30)


def pid_and_sleep(group, pid_dir: str):
    import os
    torch.ones(1, device=group.device)  # hold a CUDA context, as a real rank does
    with open(os.path.join(pid_dir, f"rank{group.rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)


# ---- CUDA graphs (tests/gpu/test_graphs_gpu.py) -------------------------------------------------------
def _graph_weights(w13: torch.Tensor) -> torch.Tensor:
    """Finite float32 matrices from random bf16 bytes (NaN patterns included): the int16 pattern, scaled."""
    return w13.view(torch.int16).float() * (2.0 ** -15 / 8)


def _graph_layer(x: torch.Tensor, w13: torch.Tensor, experts: int) -> torch.Tensor:
    """The test model's layer: mean over experts of tanh(x @ W_e), float32 ``[T, 1024]``."""
    w = _graph_weights(w13[:experts])
    return torch.tanh(torch.matmul(x.unsqueeze(0), w)).mean(0)


def graph_replay(group, num_experts: int, num_layers: int, depth: int, replays: int, seed: int,
                 engine_options: dict, refresh_every: int):
    """A DWDP forward over ``num_layers`` layers captured in one torch.cuda.graph, replayed
    ``replays`` times with new inputs, and the source weights rewritten on every rank every
    ``refresh_every`` replays. Every replay checks every byte each layer's prefetch delivered (the
    forward copies ``weights(name)`` into static buffers) and the output against an eager reference
    computed from the seeded truth. Eager forwards of the same pipeline run before, in between and
    after, and must agree too."""
    from dwdp_comm.moe import DwdpPipeline
    layers = list(range(num_layers))
    dev = group.device
    st = build_store(group, num_experts, layers, seed)
    lay = st.layout
    pf = dc.Prefetcher(st, depth=depth, chunk_nbytes=1 << 20, engine_options=engine_options)
    pipe = DwdpPipeline(pf, layers)
    T, H, X = 48, 1024, min(num_experts, 3)  # tokens; hidden = w13's rows; experts the model multiplies
    static_x = torch.zeros(T, H, device=dev)
    dumps = {l: {n: torch.empty_like(full_truth(seed, l, n, num_experts), device=dev) for n in SPECS} for l in layers}

    def forward(x):
        pipe.begin()
        for l in layers:
            h = pipe.acquire(l)
            for n in SPECS:
                dumps[l][n].copy_(h.weights(n))
            x = x + _graph_layer(x, h.weights("w13"), X)
            pipe.release(h)
        return x

    version = [seed]
    truth = {}

    def load_truth():
        truth.clear()
        for l in layers:
            for n in SPECS:
                truth[(l, n)] = full_truth(version[0], l, n, num_experts).to(dev)

    def reference(x):
        for l in layers:
            x = x + _graph_layer(x, truth[(l, "w13")], X)
        return x

    def check(y, x, what):
        torch.cuda.current_stream().synchronize()
        wrong = sum(int((dumps[l][n].view(torch.uint8) != truth[(l, n)].view(torch.uint8)).sum().item())
                    for l in layers for n in SPECS)
        ref = reference(x)
        err = float((y - ref).abs().max().item())
        return {"what": what, "wrong_bytes": wrong, "max_abs_err": err, "bitwise": bool(torch.equal(y, ref))}

    def refresh():
        """Every rank rewrites its experts (new seed): no peer's graph may read a heap meanwhile."""
        torch.cuda.synchronize()
        group.barrier()
        version[0] += 1
        for l in layers:
            for n, (shape, dtype) in SPECS.items():
                if lay.num_local_experts:
                    new = torch.stack([expert_tensor(version[0], l, n, e, shape, dtype) for e in lay.local_experts])
                    st.local(l, n).copy_(new.to(dev))
        torch.cuda.synchronize()
        group.barrier()
        load_truth()

    gen = torch.Generator(device=dev).manual_seed(seed + group.rank)
    load_truth()
    checks = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up on a side stream, as torch.cuda.graph advises
        for _ in range(2):
            static_x.copy_(torch.randn(T, H, generator=gen, device=dev))
            checks.append(check(forward(static_x), static_x, "eager warm-up"))
    torch.cuda.current_stream().wait_stream(side)
    pipe.prepare_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = forward(static_x)
    captured_jobs = pf.engine.captured_jobs
    for i in range(replays):
        if refresh_every and i and i % refresh_every == 0:
            refresh()
        static_x.copy_(torch.randn(T, H, generator=gen, device=dev))
        graph.replay()
        c = check(static_y, static_x, f"replay {i}")
        if i == replays // 2:  # eager forwards of the same pipeline in between, then replays again
            x = torch.randn(T, H, generator=gen, device=dev)
            checks.append(check(forward(x), x, "eager between replays"))
            pipe.prepare_capture()
        checks.append(c)
    x = torch.randn(T, H, generator=gen, device=dev)
    checks.append(check(forward(x), x, "eager after replays"))
    torch.cuda.synchronize()
    group.barrier()
    out = {"checks": checks, "captured_jobs": captured_jobs, "api": pf.engine_api,
           "modes": {n: st.slot_mode(0, n) for n in SPECS}, "versions": version[0] - seed, **_backend_desc(group)}
    del graph
    pipe.close()
    st.close()
    return out


def exception_on_one_rank(group, bad_rank: int, engine: dict):
    """Rank ``bad_rank`` raises inside ``with store, Prefetcher(store)``: its __exit__ must release
    locally at once (no collective: on nvshmem none of NVSHMEM's own collectives either); the others'
    close() must raise naming it."""
    st = build_store(group, 5, [0], 1)
    out = {"exit_s": None, "error": None}
    if group.rank == bad_rank:
        t0 = time.perf_counter()
        try:
            with st, dc.Prefetcher(st, depth=1, engine_options=engine) as pf:
                pf.prefetch(0).wait()
                raise ValueError("user code failed on one rank")
        except ValueError:
            out["exit_s"] = time.perf_counter() - t0
        out["closed"] = st.closed
        time.sleep(3 * group.comm.timeout_s)  # alive but never in the collective: the others time out
        group.abort()  # the group lost a rank: no collective close (nvshmem's would time out)
        return out
    pf = dc.Prefetcher(st, depth=1, engine_options=engine)
    pf.prefetch(0).wait()
    t0 = time.perf_counter()
    for step in (pf.close, st.close):  # the first error is the one that names the rank
        try:
            step()
        except dc.DwdpError as exc:
            if out["error"] is None:
                out["error"] = dict(_err(exc), time_to_error_s=time.perf_counter() - t0)
    group.abort()
    return out


def heap_write_detection(group, writer: int, seed: int):
    """Rank ``writer`` writes through every prefetched view: where the view is a composite of the
    heap (cuda_ipc VMM, composite-mode names) the write reaches the heap peers read, and
    dwdp_comm.testing.check_local_unchanged must raise on every rank naming the writer."""
    st = build_store(group, 5, [0], seed)
    digest = dc.testing.local_digest(st)
    modes = {n: st.slot_mode(0, n) for n in SPECS}
    with dc.Prefetcher(st, depth=1) as pf:
        h = pf.prefetch(0)
        h.wait()
        if group.rank == writer:
            for n in SPECS:
                h.weights(n).view(torch.uint8).bitwise_not_()
        torch.cuda.synchronize()
        h.release()
    out = {"modes": modes, "error": None}
    try:
        dc.testing.check_local_unchanged(st, digest)
    except dc.DwdpError as exc:
        out["error"] = _err(exc)
    st.close()
    return out
