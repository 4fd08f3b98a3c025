"""CPU-testable parts of the GPU layer: stream resolution, lazy imports, probes and their error
messages, engine options, the peer-access check, fd passing, and the copy executor's logic (lanes,
local lane, graphs, time-division flags) on a fake CUDA runtime whose streams run in order."""

import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

import dwdp_comm as dc
from tests.helpers import launch_rankfns
from tests.helpers import fake_cuda
from dwdp_comm import engine_options
from dwdp_comm.backends.cuda import (copies, driver, executor, fd_passing, memory, peers, streams, sync_flags,
                                    time_division)
from dwdp_comm.interop.streams import resolve_stream


# ---- resolve_stream -------------------------------------------------------------------------------
class _Proto:
    def __init__(self, ret):
        self._ret = ret

    def __cuda_stream__(self):
        return self._ret


class _PropProto:  # early cuda.core releases made it a property
    __cuda_stream__ = (0, 77)


def _fake_cupy_stream(ptr):
    cls = type("Stream", (), {"__module__": "cupy.cuda.stream", "ptr": ptr})
    return cls()


def test_resolve_stream_accepts():
    assert resolve_stream(None) == (torch.cuda.current_stream().cuda_stream if torch.cuda.is_available() else 0)
    assert resolve_stream(0) == 0 and resolve_stream(1234) == 1234
    assert resolve_stream(_Proto((0, 99))) == 99
    assert resolve_stream(_PropProto()) == 77
    assert resolve_stream(_fake_cupy_stream(4242)) == 4242


@pytest.mark.skipif(importlib.util.find_spec("cuda.bindings") is None, reason="cuda-python is not installed")
def test_resolve_stream_cuda_bindings_handles():
    from cuda.bindings import driver, runtime
    assert resolve_stream(driver.CUstream(5)) == 5
    assert resolve_stream(runtime.cudaStream_t(6)) == 6


@pytest.mark.parametrize("bad, err", [
    (True, dc.InvalidTypeError), (1.5, dc.InvalidTypeError), ("s", dc.InvalidTypeError), (object(), dc.InvalidTypeError),
    (-1, dc.InvalidArgumentError), (_Proto((1, 5)), dc.InvalidArgumentError), (_Proto(5), dc.InvalidArgumentError),
])
def test_resolve_stream_rejects(bad, err):
    with pytest.raises(err, match="^stream: "):
        resolve_stream(bad)


# ---- imports stay lazy ---------------------------------------------------------------------------------
CUDA_MODULES = ["driver", "streams", "memory", "vmm", "fd_passing", "peers", "copies", "sync_flags", "time_division",
                "executor",
                "backend"]


def test_import_needs_no_gpu_package():
    # torch itself may import cuda.bindings (some builds do): count only what dwdp_comm adds.
    code = ("import sys, torch, numpy; before = set(sys.modules); "
            "import dwdp_comm, dwdp_comm.interop, dwdp_comm.interop.streams, dwdp_comm.interop.torch, "
            "dwdp_comm.interop.cupy, dwdp_comm.backends.cuda_ipc, dwdp_comm.backends.nvshmem, "
            + ", ".join("dwdp_comm.backends.cuda." + m for m in CUDA_MODULES) + "; "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('cupy', 'cuda', 'nvshmem')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_cupy_interop_without_cupy(monkeypatch):
    from dwdp_comm.interop import MissingDependencyError
    from dwdp_comm.interop import cupy as dcp
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(MissingDependencyError, match="pip install cupy") as info:
        dcp.as_cupy(torch.zeros(3))
    assert isinstance(info.value, ImportError) and isinstance(info.value, dc.DwdpError)


# ---- probes and backend errors ------------------------------------------------------------------------
def test_probe_names_missing_package(monkeypatch):
    from dwdp_comm import backends
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    reason = backends.probe("cuda_ipc")
    assert "cuda.bindings" in reason and "pip install" in reason
    if importlib.util.find_spec("nvshmem") is None:
        reason = backends.probe("nvshmem")
        assert "nvshmem4py" in reason and "cuda_ipc" in reason and "sim" in reason


@pytest.mark.skipif(dc.testing.gpu_count() > 0, reason="checks the error on machines without GPUs")
@pytest.mark.parametrize("backend", ["cuda_ipc", "nvshmem"])
def test_gpu_backend_unavailable_on_every_rank(backend):
    res = dc.testing.launch(launch_rankfns.init_report, 2, backend, backend=None, timeout=120)
    for status, kind, msg in res:
        assert (status, kind) == ("error", "BackendUnavailableError")
        assert f"backend {backend!r} is unavailable" in msg and "rank 0" in msg and "rank 1" in msg
        assert "sim" in msg


def test_engine_options():
    assert engine_options.parse_engine_options({}, "x") == {"streams": 1, "api": "batch", "distribute": "source",
                                                    "overlap_hint": False, "sync": "none"}
    with pytest.raises(dc.InvalidArgumentError, match="streamz"):
        engine_options.parse_engine_options({"streamz": 2}, "cuda_ipc")
    with pytest.raises(dc.InvalidArgumentError, match="streams"):
        engine_options.parse_engine_options({"streams": 0}, "cuda_ipc")
    with pytest.raises(dc.InvalidTypeError, match="streams"):
        engine_options.parse_engine_options({"streams": True}, "cuda_ipc")
    with pytest.raises(dc.InvalidArgumentError, match="api"):
        engine_options.parse_engine_options({"api": "fast"}, "cuda_ipc")
    with pytest.raises(dc.InvalidArgumentError, match="distribute"):
        engine_options.parse_engine_options({"distribute": "random"}, "cuda_ipc")


def test_peer_access_problems_name_the_pair():
    infos = [{"host": "h", "device": d, "pci": f"0000:{d:02x}:00.0"} for d in range(3)]
    infos.append({"host": "other", "device": 0, "pci": "0000:00:00.0"})  # another host: not checked
    visible = {i["pci"]: i["device"] for i in infos[:3]}
    no_pair = {(0, 2), (2, 0)}
    probs = peers.peer_access_problems(infos, 0, visible, lambda a, b: (a, b) not in no_pair)
    assert probs == ["rank 0 (GPU 0, 0000:00:00.0) cannot access the memory of rank 2 (GPU 2, 0000:02:00.0)"]
    assert peers.peer_access_problems(infos, 1, visible, lambda a, b: (a, b) not in no_pair) == []


def test_raise_gathered_lists_every_rank():
    with pytest.raises(dc.PeerAccessError, match=r"(?s)failed on 2 of 3 ranks.*rank 0: a.*rank 2: b.*use sim"):
        peers.raise_gathered(["a", None, "b"], "opening", dc.PeerAccessError, "use sim")
    peers.raise_gathered([None, None], "opening")


@pytest.mark.skipif(importlib.util.find_spec("cuda.bindings") is None, reason="cuda-python is not installed")
def test_check_names_api_and_error():
    from cuda.bindings import runtime
    assert driver.check((runtime.cudaError_t.cudaSuccess, 5), "x") == 5
    assert driver.check((runtime.cudaError_t.cudaSuccess,), "x") is None
    with pytest.raises(driver.CudaError, match=r"cudaMemcpyAsync failed: cudaErrorInvalidValue \(1\): ctx"):
        driver.check((runtime.cudaError_t.cudaErrorInvalidValue,), "cudaMemcpyAsync", "ctx")


def test_pidfd_getfd_duplicates_a_descriptor():
    with tempfile.TemporaryFile() as f:
        f.write(b"dwdp")
        f.flush()
        try:
            fd = fd_passing.pidfd_getfd(os.getpid(), f.fileno())
        except OSError as exc:  # old kernel (ENOSYS) or a sandbox that forbids it (EPERM)
            pytest.skip(f"pidfd_getfd unavailable here: {exc}")
        try:
            assert os.pread(fd, 4, 0) == b"dwdp"
        finally:
            os.close(fd)
    with pytest.raises(OSError, match="pidfd_getfd"):
        fd_passing.pidfd_getfd(os.getpid(), 987654)


# ---- the executor's logic on a fake CUDA runtime (host memory, in-order streams) -----------------------
# FakeGPU (the fake runtime) lives in tests/helpers/fake_cuda.py, shared with test_graphs_cpu.py.
_FakeGPU, _FakeDriverCalls, _HostAlloc = fake_cuda.FakeGPU, fake_cuda.FakeDriverCalls, fake_cuda.HostAlloc


@pytest.fixture
def fake(monkeypatch):
    return fake_cuda.install(monkeypatch)


def _plain(opts):
    """Parsed engine options without ``sync`` (what :class:`CopyExecutor` takes; the time-division
    executor takes ``sync`` and its flags)."""
    assert opts["sync"] == "none"
    return {k: v for k, v in opts.items() if k != "sync"}


def _first_copy_index(log, stream, kinds=("copy", "batch", "launch")):
    return next(i for i, e in enumerate(log) if e[0] in kinds and e[1] == stream)


@pytest.mark.parametrize("opts, remote_rank", [
    ({"streams": 2}, None), ({"streams": 1, "api": "memcpy"}, None), ({"streams": 3, "distribute": "slot"}, None),
    ({"streams": 2, "api": "memcpy"}, 2), ({"streams": 2}, 2), ({"api": "memcpy", "streams": 2}, 0)])
def test_executor_logic_on_fake_runtime(fake, opts, remote_rank):
    import numpy as np
    from dwdp_comm.planner import CopyRange, make_plan
    G, rank, n = 3, 1, 1 << 16
    rng = np.random.default_rng(0)
    heaps = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(G)]
    dst_data = np.zeros(n, dtype=np.uint8)
    dst = memory.DeviceBuffer(_HostAlloc(dst_data))
    ptrs = [int(h.ctypes.data) for h in heaps]
    gets = []

    def remote_get(d, sym_src, nbytes, pe, stream):  # an NVSHMEM get: symmetric address -> PE's copy
        gets.append((pe, nbytes))
        fake.enqueue(stream, ("copy", d, ptrs[pe] + (sym_src - ptrs[rank]), nbytes))

    src_ptrs = [None if r == remote_rank else p for r, p in enumerate(ptrs)]
    eng = executor.CopyExecutor(device=0, rank=rank, group_size=G, src_ptrs=src_ptrs, src_nbytes=n,
                             remote_get=remote_get if remote_rank is not None else None,
                             sym_ptr=ptrs[rank] if remote_rank is not None else None,
                             **_plain(engine_options.parse_engine_options(opts, "test")))
    assert eng.api == opts.get("api", "batch")  # the batch probe passed
    assert len(eng.streams) == eng.num_streams + 1 and eng.local_lane == eng.num_streams
    src_base, dst_base = 4096, 512
    # CopyRange(1, ...) is a local copy (rank 1 reads itself: gather mode)
    ranges = [CopyRange(0, 0, 0, 5000), CopyRange(2, 100, 6000, 7000), CopyRange(1, 300, 20000, 3000),
              CopyRange(0, 9000, 30000, 1234)]
    plan = make_plan(ranges, rank=rank, group_size=G, chunk_nbytes=1024)
    gate = streams.CudaStream()
    hold = np.zeros(1, dtype=np.uint64)  # a "compute stream" held until the test lets it go
    fake.enqueue(gate.handle, ("wait", hold.ctypes.data, 1, 64))
    after = streams.CudaEvent().record(gate.handle)
    for job in range(2):
        fake.log.clear()
        dst_data[:] = 0
        done = eng.submit(plan, src_base=src_base, dst=dst, dst_base=dst_base, after=[after])
        if job == 0:
            assert not dst_data.any(), "a copy ran before its 'after' event"
            hold[0] = 1
        fake.progress()
        assert fake.events[done.handle][1] == fake.events[done.handle][0], "the done event did not complete"
        for r in ranges:
            got = dst_data[dst_base + r.dst_offset:dst_base + r.dst_offset + r.nbytes]
            want = heaps[r.src_rank][src_base + r.src_offset:src_base + r.src_offset + r.nbytes]
            assert np.array_equal(got, want), r
        # Every copy stream waited for the 'after' event before its first copy; local copies on the local
        # lane only, remote ones never there; the done event is recorded last, after joining every lane.
        kinds = ("copy", "batch")
        used = []
        for e in fake.log:
            if e[0] in kinds and e[1] not in used:
                used.append(e[1])
        for s in used:
            assert ("wait", s, after.handle) in fake.log[:_first_copy_index(fake.log, s, kinds)]
        local_stream = eng.streams[eng.local_lane]
        assert used[0] == local_stream, "local copies are issued first, on their own lane"
        assert len(used) <= eng.num_streams + 1
        assert fake.log[-1] == ("record", done.handle, fake.log[-1][2])
        join = fake.log[-1][2]
        for s in used:
            if s != join:  # an event recorded on s, waited for by the join stream before the done event
                rec = [e[1] for e in fake.log if e[0] == "record" and e[2] == s]
                assert any(("wait", join, ev) in fake.log for ev in rec), s
        n_local = sum(1 for e in fake.done if e[0] == "copy" and e[1] == local_stream)
        assert n_local == sum(1 for c in plan.copies() if c[1] == rank)
        fake.done.clear()
    if remote_rank is not None:
        assert gets and {pe for pe, _ in gets} == {remote_rank}
    bad = make_plan([CopyRange(0, n - 100, 0, 4096)], rank=rank, group_size=G)
    with pytest.raises(dc.InvalidArgumentError, match="inside the heap"):
        eng.submit(bad, src_base=0, dst=dst, dst_base=0)
    eng.close()
    with pytest.raises(dc.ClosedError):
        eng.submit(plan, src_base=0, dst=dst, dst_base=0)
    gate.close()


def test_local_copies_overlap_peer_copies(fake):
    """streams=1: the peer pull and the local copy are on different streams, both start after 'after'
    and the done event waits for both (the nvshmem 1 GiB case: 84.5 % -> the local copy hides)."""
    import numpy as np
    from dwdp_comm.planner import CopyRange, make_plan
    G, rank, n = 2, 0, 1 << 14
    heaps = [np.full(n, r + 1, dtype=np.uint8) for r in range(G)]
    dst_data = np.zeros(2 * n, dtype=np.uint8)
    dst = memory.DeviceBuffer(_HostAlloc(dst_data))
    eng = executor.CopyExecutor(device=0, rank=rank, group_size=G, src_ptrs=[int(h.ctypes.data) for h in heaps],
                             src_nbytes=n, streams=1, api="memcpy")
    plan = make_plan([CopyRange(1, 0, 0, n), CopyRange(0, 0, n, n)], rank=rank, group_size=G, chunk_nbytes=n)
    peer = eng.streams[0]
    # hold the peer lane (a long pull still running): the local copy must still complete
    hold = np.zeros(1, dtype=np.uint64)
    fake.enqueue(peer, ("wait", hold.ctypes.data, 1, 64))
    done = eng.submit(plan, src_base=0, dst=dst, dst_base=0)
    assert (dst_data[n:] == 1).all() and not dst_data[:n].any()
    assert not fake.events[done.handle][1], "done before the peer copy"
    hold[0] = 1
    fake.progress()
    assert (dst_data[:n] == 2).all() and fake.events[done.handle][1]
    eng.close()


# ---- time division (sync) on the fake GPU: G ranks in one process ---------------------------------------
class _SyncWorld:
    """``G`` fake ranks sharing one fake GPU: heaps, flag arrays, destination buffers and sync
    executors; ``unmapped`` = {(rank, peer)}: rank's flags of peer are reached by NVSHMEM signal."""

    def __init__(self, fake, G, opts, *, n=1 << 13, jobs_room=4, bits=64, unmapped=(), start_job=0):
        import numpy as np
        self.fake, self.G, self.n, self.opts = fake, G, n, engine_options.parse_engine_options(opts, "test")
        rng = np.random.default_rng(G)
        self.heaps = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(G)]
        self.stride = G * n  # destination bytes per job
        self.dst_data = [np.zeros(jobs_room * self.stride, dtype=np.uint8) for _ in range(G)]
        self.dsts = [memory.DeviceBuffer(_HostAlloc(d)) for d in self.dst_data]
        L, mode = self.opts["streams"], self.opts["sync"]
        nwords = sync_flags.SyncFlags.num_words(mode, G, L)
        self.words = [np.zeros(nwords, dtype=np.uint64) for _ in range(G)]
        self.flags, self.engines = [], []
        for r in range(G):
            peers = [None if (r, t) in unmapped else int(self.words[t].ctypes.data) for t in range(G)]
            peers[r] = int(self.words[r].ctypes.data)

            def signal(sym_addr, value, pe, stream, r=r):
                off = sym_addr - int(self.words[r].ctypes.data)
                self.signals.append((r, pe))
                fake.enqueue(stream, ("write", int(self.words[pe].ctypes.data) + off, value, 64))

            f = sync_flags.SyncFlags(mode=mode, rank=r, group_size=G, num_lanes=L, distribute=self.opts["distribute"],
                                bits=bits, local_ptr=peers[r], peer_ptrs=peers, sym_ptr=peers[r], remote_signal=signal)
            self.flags.append(f)
            self.engines.append(time_division.TimeDivisionExecutor(device=0, rank=r, group_size=G,
                                                   src_ptrs=[int(h.ctypes.data) for h in self.heaps], src_nbytes=n,
                                                   flags=f, **self.opts))
        self.signals = []
        if start_job:  # as if start_job jobs had run: every word at E(start_job - 1)
            for r in range(G):
                self.engines[r].jobs = start_job
                self.words[r][:] = self.flags[r].value(start_job - 1, self.flags[r].end)
        self.copies = {}  # (rank, dst address) -> (job, slot, src)
        fake.log.clear()  # the batch probes of the engines
        fake.done.clear()

    def plan(self, r, job, nbytes=None, local=True):
        from dwdp_comm.planner import CopyRange, make_plan
        nbytes = nbytes or [self.n] * self.G
        ranges = [CopyRange(s, 0, j * self.n, nbytes[s]) for j, s in enumerate(x for x in range(self.G) if x != r)
                  if nbytes[s]]
        if local:
            ranges.append(CopyRange(r, 0, (self.G - 1) * self.n, self.n))
        return make_plan(ranges, rank=r, group_size=self.G, policy="round_robin", chunk_nbytes=self.n // 4)

    def submit(self, r, job, plan, after=()):
        base = (job % (len(self.dst_data[r]) // self.stride)) * self.stride
        for slot, s, so, do, nb in plan.copies():
            self.copies[(r, int(self.dsts[r].ptr) + base + do)] = (job, slot, s)
        self.dst_data[r][base:base + self.stride] = 0xA5  # poison: what no copy writes must stay
        ev = self.engines[r].submit(plan, src_base=0, dst=self.dsts[r], dst_base=base, after=after)
        return ev, base

    def run_job(self, job, plans=None):
        """Submit ``job`` on every rank (``plans[r]``, default :meth:`plan`), run the fake GPU until
        idle: nothing may stay pending (a deadlock), and every rank's bytes must be right."""
        plans = plans or [self.plan(r, job) for r in range(self.G)]
        evs = [(r, p, *self.submit(r, job, p)) for r, p in enumerate(plans)]
        self.fake.progress()
        assert self.fake.pending() == 0, f"job {job} deadlocked"
        for r, plan, ev, base in evs:
            self.check_bytes(r, plan, base)

    def check_bytes(self, r, plan, base):
        """The whole job region: the copied ranges hold their sources' bytes, the rest the poison."""
        import numpy as np
        want = np.full(self.stride, 0xA5, dtype=np.uint8)
        for slot, s, so, do, nb in plan.copies():
            want[do:do + nb] = self.heaps[s][so:so + nb]
        got = self.dst_data[r][base:base + self.stride]
        bad = np.flatnonzero(got != want)
        assert not bad.size, f"rank {r}: {bad.size} wrong bytes, first at {int(bad[0])}"

    def executed(self):
        """Executed copies in order: (rank, job, slot, src)."""
        out = []
        for e in self.fake.done:
            if e[0] == "copy":
                for r in range(self.G):
                    hit = self.copies.get((r, e[2]))
                    if hit is not None and self.dsts[r].ptr <= e[2] < self.dsts[r].ptr + self.dsts[r].nbytes:
                        out.append((r, *hit))
                        break
        return out

    def check_order(self):
        """The model's rule, on the execution order: a remote copy of slot k (job j) runs only after
        every earlier-slot copy of job j (``slot``), or every earlier-slot copy read from the same
        source (``source``), of every rank ran."""
        ex = self.executed()
        mode = self.opts["sync"]
        remote = [(r, j, k, s) for r, j, k, s in ex if s != r]
        for i, (r, j, k, s) in enumerate(remote):
            later = remote[i + 1:]
            for r2, j2, k2, s2 in later:
                if j2 != j or k2 >= k:
                    continue
                if mode == "slot" or s2 == s:
                    raise AssertionError(f"rank {r} ran job {j} slot {k} (src {s}) before rank {r2} finished slot "
                                         f"{k2} (src {s2})")
        return ex

    def check_monotone(self, bits=64):
        """Every flag word only ever grows (cyclically) across all jobs."""
        last = {}
        m = (1 << bits) - 1
        for e in self.fake.done:
            if e[0] == "write":
                addr, v = e[2], e[3]
                if addr in last:
                    assert ((v - last[addr]) & m) < (1 << (bits - 1)), f"flag 0x{addr:x} went {last[addr]} -> {v}"
                last[addr] = v
        return last


@pytest.mark.parametrize("opts", [
    {"sync": "slot", "api": "memcpy"}, {"sync": "slot"}, {"sync": "slot", "streams": 2, "api": "memcpy"},
    {"sync": "slot", "streams": 2, "distribute": "slot"}, {"sync": "source", "api": "memcpy"},
    {"sync": "source", "streams": 2}, {"sync": "source", "streams": 2, "distribute": "slot", "api": "memcpy"}])
@pytest.mark.parametrize("G", [2, 3])
def test_sync_flags_on_fake_ranks(fake, opts, G):
    """A late rank (its 'after' held) stops the others exactly where the model says; then every byte
    arrives, the flag values grow monotonically across jobs, and each word ends at E(last job)."""
    import numpy as np
    w = _SyncWorld(fake, G, opts)
    late = G - 1
    gate = streams.CudaStream()
    hold = np.zeros(1, dtype=np.uint64)
    fake.enqueue(gate.handle, ("wait", hold.ctypes.data, 1, 64))
    held = streams.CudaEvent().record(gate.handle)
    jobs = []
    for job in range(3):
        for r in range(G):
            plan = w.plan(r, job)
            after = [held] if (r == late and job == 0) else []
            jobs.append((r, plan, *w.submit(r, job, plan, after)))
        if job == 0:
            ex = w.check_order()
            assert not [x for x in ex if x[0] == late], "the held rank copied before its 'after' event"
            ran = {(r, k) for r, j, k, s in ex if s != r}
            assert ran, "nobody made progress while one rank was held"
            if opts["sync"] == "slot":  # nobody gets past slot 0 while the late rank has not done slot 0
                assert max(k for _, k in ran) == 0
            local = [x for x in ex if x[0] == x[3]]
            assert {x[0] for x in local} == set(range(G)) - {late}, "local copies wait for nobody but 'after'"
    hold[0] = 1
    fake.progress()
    assert fake.pending() == 0, "some stream is still waiting"
    for r, plan, ev, base in jobs:
        assert fake.events[ev.handle][1] == fake.events[ev.handle][0]
    w.check_order()
    last = w.check_monotone()
    for r, plan, ev, base in jobs[-G:]:
        w.check_bytes(r, plan, base)
    end = w.flags[0].value(2, w.flags[0].end)
    for r, f in enumerate(w.flags):  # every maintained word ends the last job at E(2), in every array
        for ln in range(f.num_lanes):
            for K in f.maintained(ln):
                for t in f.targets(K):
                    assert int(w.words[t][f.word(K, r, ln)]) == end, (r, t, K, ln)
    assert last
    # ordering on each lane (host order = stream order): waits right before a slot's copies, writes
    # right after them; writes alone where the lane has nothing in a slot
    for r in range(G):
        for ln, st in enumerate(w.engines[r].streams[:-1]):
            seq = [e for e in fake.log if e[1] == st and e[0] in ("memop", "copy", "batch")]
            text = "".join("W" if e[0] == "memop" and e[2] in (1, 4) else "X" if e[0] == "memop" else "C" for e in seq)
            assert re.fullmatch(r"(X|W*C+X+)*", text), f"rank {r} lane {ln}: {text}"
    if w.opts["api"] == "memcpy":  # lanes are issued slot-major: a queue shared by lanes never has a
        for r in range(G):         # wait ahead of a write it depends on
            remote = set(w.engines[r].streams[:-1])
            seen = [w.copies[(r, e[3])] for e in fake.log if e[0] == "copy" and e[1] in remote]
            for job in range(3):
                slots = [k for j, k, s in seen if j == job]
                assert slots == sorted(slots), (r, job, slots)
    for r in range(G):
        w.engines[r].close()
    gate.close()


def test_sync_job_values_and_lane_program(fake):
    """The flag operations of one job, spelled out (G = 2, sync='slot', 3 slots): no wait before slot
    0; before slot k a wait for the peer's word >= V(k - 1); after slot k a write of V(k) to both
    arrays, E after the last; a second job folds the job number in."""
    import numpy as np
    w = _SyncWorld(fake, 2, {"sync": "slot", "api": "memcpy"}, n=3 * 1024)
    f = w.flags[0]
    plan = w.plan(0, 0, local=False)
    plan1 = w.plan(1, 0, local=False)
    assert plan.num_slots == 4 and f.span == 1 << 32
    for job in range(2):
        fake.log.clear()
        w.submit(0, job, plan)
        w.submit(1, job, plan1)
        st = w.engines[0].streams[0]
        mem = [(e[2], e[3], e[4]) for e in fake.log if e[0] == "memop" and e[1] == st]
        w0, w1 = (int(w.words[t].ctypes.data) + 8 * f.word(0, 0, 0) for t in range(2))
        peer = int(w.words[0].ctypes.data) + 8 * f.word(0, 1, 0)
        V = lambda k: job * (1 << 32) + k + 1  # noqa: E731
        E = job * (1 << 32) + (1 << 32) - 1
        want = [(5, w0, V(0)), (5, w1, V(0))]
        for k in (1, 2, 3):
            want += [(4, peer, V(k - 1)), (5, w0, V(k) if k < 3 else E), (5, w1, V(k) if k < 3 else E)]
        assert mem == want
    fake.progress()
    assert fake.pending() == 0
    for r in range(2):
        w.engines[r].close()


@pytest.mark.parametrize("api", ["memcpy", "batch"])
def test_sync_uneven_and_empty_plans_do_not_deadlock(fake, api):
    """Ranks with different slot counts and odd chunk sizes, and a rank with nothing to copy (an empty
    plan), in the same jobs: E(j) releases every later slot of job j."""
    w = _SyncWorld(fake, 3, {"sync": "slot", "api": api})
    for job in range(3):
        plans = []
        for r in range(3):
            if job == 1 and r == 2:
                from dwdp_comm.planner import make_plan
                plans.append(make_plan([], rank=2, group_size=3))
            else:
                nbytes = [w.n - 8, w.n // 2 + 40 if job == 2 else w.n - 1, w.n // 4 + 3]
                plans.append(w.plan(r, job, nbytes=nbytes))
        w.run_job(job, plans)
    w.check_order()
    w.check_monotone()
    for r in range(3):
        w.engines[r].close()


@pytest.mark.parametrize("bits", [64, 32])
def test_sync_values_wrap_without_reset(fake, bits):
    """Jobs past 2**16 with 32-bit flags (values wrap modulo 2**32, compared cyclically) and the same
    sequence with 64-bit ones: order and bytes stay right, no word is ever reset."""
    w = _SyncWorld(fake, 3, {"sync": "source", "api": "memcpy"}, bits=bits, start_job=(1 << 16) - 2)
    for job in range(4):
        w.run_job(job)
    w.check_order()
    w.check_monotone(bits)
    assert any(e[0] == "write" and e[3] < 1 << 16 for e in fake.done) == (bits == 32), "32-bit values wrapped"
    for r in range(3):
        w.engines[r].close()


def test_sync_unmapped_peer_uses_signals(fake):
    """Rank 0 has no mapping of rank 2's flags (another node): its writes to rank 2 go through the
    NVSHMEM-signal callable, on the same stream, in the same place."""
    w = _SyncWorld(fake, 3, {"sync": "slot"}, unmapped={(0, 2)})
    for job in range(2):
        w.run_job(job)
    assert w.signals and set(w.signals) == {(0, 2)}
    w.check_order()
    w.check_monotone()
    for r in range(3):
        w.engines[r].close()


def test_sync_submit_checks(fake):
    from dwdp_comm.planner import make_plan
    w = _SyncWorld(fake, 2, {"sync": "slot"})
    with pytest.raises(dc.InvalidArgumentError, match="rank 0 of a group of 2"):
        w.engines[0].submit(w.plan(1, 0), src_base=0, dst=w.dsts[0], dst_base=0)
    f32 = sync_flags.SyncFlags(mode="slot", rank=0, group_size=2, num_lanes=1, distribute="source", bits=32,
                          local_ptr=1, peer_ptrs=[1, 2])
    assert f32.max_slots == (1 << 16) - 2 and f32.value(1, 5) == (1 << 16) + 5
    assert f32.value(1 << 16, 1) == 1  # wraps modulo 2**32
    with pytest.raises(dc.InvalidArgumentError, match="flags"):
        time_division.TimeDivisionExecutor(device=0, rank=0, group_size=2, src_ptrs=[1, 2], src_nbytes=1, sync="slot",
                                           flags=None)
    with pytest.raises(dc.InvalidArgumentError, match="flags"):  # flags of another engine
        time_division.TimeDivisionExecutor(device=0, rank=0, group_size=2, src_ptrs=[1, 2], src_nbytes=1,
                                           sync="source", flags=w.flags[0])
    with pytest.raises(dc.InvalidArgumentError, match="remote_signal"):
        sync_flags.SyncFlags(mode="slot", rank=0, group_size=2, num_lanes=1, distribute="source", bits=64,
                        local_ptr=1, peer_ptrs=[1, None])
    empty = make_plan([], rank=0, group_size=2)
    ev, _ = w.submit(0, 0, empty)
    ev1, _ = w.submit(1, 0, w.plan(1, 0))
    fake.progress()
    assert fake.pending() == 0
    for e in w.engines:
        e.close()


# ---- collective steps with ranks in threads (fake comm) ----------------------------------------------------
class _ThreadComm:
    """all_gather_object / barrier between threads (one per fake rank)."""

    def __init__(self, shared, rank):
        self.s, self.rank, self.size = shared, rank, shared["size"]

    def all_gather_object(self, obj):
        s = self.s
        s["slots"][self.rank] = obj
        s["barrier"].wait()
        out = list(s["slots"])
        s["barrier"].wait()
        return out

    def barrier(self):
        self.s["barrier"].wait()

    def agree(self, error, step, exc_type=None, hint="", cause=None):
        """As :meth:`dwdp_comm.group.Comm.agree`: the same error on every rank if any has one."""
        from dwdp_comm.errors import gathered_error
        err = gathered_error(self.all_gather_object(error), step, exc_type, hint)
        if err is not None:
            raise err from cause


def _thread_world(G):
    import threading
    return {"size": G, "slots": [None] * G, "barrier": threading.Barrier(G, timeout=30), "arrays": [None] * G}


class _FakeSymHeap:
    """A collective allocation of host words; ``lost`` = {(rank, peer)}: rank's writes to peer go to scratch."""

    def __init__(self, shared, comm, nbytes, lost=()):
        import numpy as np
        self.comm = comm
        data = np.zeros(nbytes // 8 + 1, dtype=np.uint64)
        data[:] = 0xDEADBEEF  # not zero: the engine zeroes it
        shared["arrays"][comm.rank] = data
        self._scratch = np.zeros_like(data)
        comm.barrier()
        self.local = memory.DeviceBuffer(_HostAlloc(data))
        self.peer_ptrs = [int((self._scratch if (comm.rank, t) in lost else shared["arrays"][t]).ctypes.data)
                          for t in range(comm.size)]
        self.peer_ptrs[comm.rank] = int(data.ctypes.data)
        comm.barrier()
        self.closed = False

    def close(self):
        self.comm.barrier()
        self.closed = True


def _run_threads(G, fn):
    import threading
    shared = _thread_world(G)
    out, errs = [None] * G, [None] * G

    def body(r):
        try:
            out[r] = fn(_ThreadComm(shared, r), shared)
        except BaseException as exc:  # noqa: BLE001
            errs[r] = exc

    ts = [threading.Thread(target=body, args=(r,)) for r in range(G)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts), "a rank hung"
    return out, errs


@pytest.mark.parametrize("bits64", [1, 0])
def test_create_sync_flags_handshake(fake, bits64):
    fake.bits64 = bits64
    heaps = {}

    def rank(comm, shared):
        def alloc(n):
            heaps[comm.rank] = _FakeSymHeap(shared, comm, n)
            return heaps[comm.rank]
        f = sync_flags.create_sync_flags(comm, 0, sync="source", streams=2, distribute="source", alloc=alloc, timeout_s=10)
        words = shared["arrays"][comm.rank]
        return f, [int(x) for x in words[:f.nbytes // 8]]

    out, errs = _run_threads(3, rank)
    assert errs == [None] * 3, errs
    for r, (f, words) in enumerate(out):
        assert f.bits == (64 if bits64 else 32) and f.owner is heaps[r]
        assert words[:f.probe_word(0)] == [0] * f.probe_word(0), "flag words not zeroed"
        assert words[f.probe_word(0):] == [1, 1, 1], "handshake probe words"
    _, errs = _run_threads(3, lambda comm, shared: out[comm.rank][0].close())
    assert errs == [None] * 3 and all(h.closed for h in heaps.values())


def test_create_sync_flags_failures_raise_on_every_rank(fake):
    # 1. lost writes: rank 1's flag writes to rank 0 never arrive -> the handshake times out on rank 0
    heaps = {}

    def rank(comm, shared):
        def alloc(n):
            heaps[comm.rank] = _FakeSymHeap(shared, comm, n, lost={(1, 0)})
            return heaps[comm.rank]
        return sync_flags.create_sync_flags(comm, 0, sync="slot", streams=1, distribute="source", alloc=alloc,
                                       timeout_s=0.3)

    _, errs = _run_threads(2, rank)
    for e in errs:
        assert isinstance(e, dc.InvalidArgumentError), e
        assert "sync='slot'" in str(e) and "ranks [1]" in str(e) and "sync='none'" in str(e)
    assert all(h.closed for h in heaps.values()), "the flags were not freed after the failed handshake"
    assert fake.pending() == 0, "a handshake stream was left waiting"
    # 2. ranks disagree on the options
    _, errs = _run_threads(2, lambda comm, shared: sync_flags.create_sync_flags(
        comm, 0, sync="slot", streams=1 + comm.rank, distribute="source", alloc=None))
    assert all(isinstance(e, dc.CollectiveMismatchError) and "streams" in str(e) for e in errs), errs
    # 3. no cuStreamBatchMemOp in the driver
    copies.DriverCopyCalls.instance = _FakeDriverCalls(fake, memops=False)
    _, errs = _run_threads(2, lambda comm, shared: sync_flags.create_sync_flags(
        comm, 0, sync="source", streams=1, distribute="source", alloc=None))
    assert all(isinstance(e, dc.InvalidArgumentError) and "cuStreamBatchMemOp" in str(e) and "sync='source'" in str(e)
               for e in errs), errs


def test_sync_close_with_missing_jobs_releases_and_raises(fake):
    """Rank 2 submits one job fewer: ranks 0 and 1 stay waiting on the GPU (never the host); close()
    (collective) releases them, lets the copies finish and raises the same error on every rank."""
    G = 3
    w = _SyncWorld(fake, G, {"sync": "slot", "api": "memcpy"})
    got = {}
    for job in range(2):
        for r in range(G):
            if job == 1 and r == 2:
                continue
            p = w.plan(r, job)
            got[(r, job)] = (p, *w.submit(r, job, p))
    assert fake.pending() > 0  # ranks 0 and 1 wait for rank 2's job 1

    def close(comm, _shared):
        w.flags[comm.rank].comm = comm
        w.engines[comm.rank].close()

    _, errs = _run_threads(G, close)
    for e in errs:
        assert isinstance(e, dc.CollectiveMismatchError) and "[2, 2, 1]" in str(e), e
    assert fake.pending() == 0
    for (r, job), (p, ev, base) in got.items():
        w.check_bytes(r, p, base)


class _LostPeerComm:
    """Rank 0's view of a group whose rank 1 never comes: every collective step times out."""
    rank, size = 0, 2

    def all_gather_object(self, obj):
        raise dc.CollectiveTimeoutError("object exchange: rank(s) [1] did not arrive", "object exchange", 0, [1])

    def barrier(self):
        self.all_gather_object(None)


class _BrokenTransportHeap:
    """A symmetric allocation on a failed transport: its collective close raises, abort releases."""

    def __init__(self):
        self.closed = self.aborted = False

    def close(self):
        raise dc.TransportError("closing the heap: not started, the group's transport failed in an earlier step")

    def abort(self):
        self.aborted = True


def test_sync_close_raises_the_first_error_and_frees_the_flags_locally(fake):
    """close()'s job-count exchange times out (rank 1 never comes): close raises that error, naming
    rank 1, and frees the flag words locally; the collective free would fail on the broken transport
    and hide the rank's name (found on the H200: test_exception_on_one_rank_is_local_and_named)."""
    w = _SyncWorld(fake, 2, {"sync": "slot", "api": "memcpy"})
    w.run_job(0)
    heap = _BrokenTransportHeap()
    w.flags[0].comm, w.flags[0].owner = _LostPeerComm(), heap
    with pytest.raises(dc.CollectiveTimeoutError) as e:
        w.engines[0].close()
    assert e.value.missing == [1], e.value
    assert heap.aborted and w.flags[0].closed, "the flag words were not released locally"


# ---- engine options -----------------------------------------------------------------------------------------
def test_engine_options_sync():
    p = engine_options.parse_engine_options
    assert p({}, "x") == {"streams": 1, "api": "batch", "distribute": "source", "overlap_hint": False,
                          "sync": "none"}
    assert p({"sync": "slot", "api": "batch"}, "x")["sync"] == "slot"
    assert p({"sync": "source"}, "x")["sync"] == "source"
    with pytest.raises(dc.InvalidArgumentError, match="sync"):
        p({"sync": "barrier"}, "cuda_ipc")
    with pytest.raises(dc.InvalidArgumentError, match="sync"):
        p({"sync": True}, "cuda_ipc")
    with pytest.raises(dc.InvalidArgumentError, match=r"\['graph'\].*was removed.*api='batch'"):
        p({"graph": True}, "cuda_ipc")  # the engine's own graphs are gone: the error says so
    with pytest.raises(dc.InvalidArgumentError, match="graphs"):
        p({"graphs": True}, "nvshmem")


@pytest.mark.skipif(importlib.util.find_spec("cuda.bindings") is None, reason="cuda-python is not installed")
def test_memop_layout_matches_cuda_bindings():
    """MEMOP_DTYPE and the op / flag constants against cuda.bindings' CUstreamBatchMemOpParams and enums."""
    import ctypes
    import numpy as np
    from cuda.bindings import driver as d
    T = d.CUstreamBatchMemOpType
    assert (copies.OP_WAIT_VALUE_32, copies.OP_WRITE_VALUE_32, copies.OP_WAIT_VALUE_64, copies.OP_WRITE_VALUE_64) == (
        int(T.CU_STREAM_MEM_OP_WAIT_VALUE_32), int(T.CU_STREAM_MEM_OP_WRITE_VALUE_32),
        int(T.CU_STREAM_MEM_OP_WAIT_VALUE_64), int(T.CU_STREAM_MEM_OP_WRITE_VALUE_64))
    assert copies.WAIT_VALUE_GEQ == int(d.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
    assert copies.WRITE_VALUE_DEFAULT == int(d.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)
    assert copies.MEMOP_DTYPE.itemsize == 8 * len(d.CUstreamBatchMemOpParams().pad) == 48
    for member, op, value in (("waitValue", copies.OP_WAIT_VALUE_64, 0xAABBCCDDEEFF0011),
                              ("writeValue", copies.OP_WRITE_VALUE_32, 0x12345678)):
        ref = d.CUstreamBatchMemOpParams()
        m = getattr(ref, member)
        m.operation = T(op)
        m.address = 0x1122334455667788
        if op == copies.OP_WRITE_VALUE_32:
            m.value = value
        else:
            m.value64 = value
        m.flags = 0x7
        m.alias = 0x99
        mine = np.zeros(1, dtype=copies.MEMOP_DTYPE)
        mine["operation"], mine["address"], mine["value"], mine["flags"], mine["alias"] = (
            op, 0x1122334455667788, value, 0x7, 0x99)
        assert ctypes.string_at(ref.getPtr(), 40) == mine.tobytes()[:40], member


def test_build_sync_program_source_mode_targets():
    """sync='source', G = 3, rank 0 round robin (reads 1 in slots 0, 2; 2 in slots 1, 3): the word of
    key 2 starts at V(0) (no key-2 copy in slot 0), is never written to rank 2 itself, and waits name
    only readers of the same source."""
    import numpy as np
    f = sync_flags.SyncFlags(mode="source", rank=0, group_size=3, num_lanes=1, distribute="source", bits=64,
                        local_ptr=1 << 20, peer_ptrs=[1 << 20, 2 << 20, 3 << 20])
    slot, src = np.array([0, 1, 2, 3]), np.array([1, 2, 1, 2])
    prog = time_division.build_sync_program(f, slot, src, np.zeros(4, dtype=np.int64))
    ops = prog.ops
    (ln, (a, b), sig), = prog.init
    assert [(int(o["operation"]), int(o["address"])) for o in ops[a:b]] == [
        (5, (t + 1 << 20) + 8 * f.word(2, 0, 0)) for t in (0, 1)]
    assert list(prog.rel[a:b]) == [1, 1]
    steps = [(st.slot, list(st.copies),
              [(int(o["operation"]), int(o["address"]), int(r)) for o, r in zip(ops[slice(*st.waits)],
                                                                                 prog.rel[slice(*st.waits)])],
              [(int(o["address"]), int(r)) for o, r in zip(ops[slice(*st.writes)], prog.rel[slice(*st.writes)])])
             for st in prog.steps]
    assert list(prog.perm) == [0, 1, 2, 3] and [(st.start, st.stop) for st in prog.steps] == [(i, i + 1) for i in range(4)]
    assert steps[0] == (0, [0], [], [((t + 1 << 20) + 8 * f.word(1, 0, 0), 2) for t in (0, 2)])
    # slot 1 reads 2: wait for rank 1's key-2 word >= V(0); rank 2 never reads itself
    assert steps[1][2] == [(4, (1 << 20) + 8 * f.word(2, 1, 0), 1)]
    assert steps[3][3] == [((t + 1 << 20) + 8 * f.word(2, 0, 0), f.end) for t in (0, 1)]


def test_cuda_error_survives_pickling():
    """A CudaError raised in a rank crosses testing.launch's pipe: it must unpickle (it did not)."""
    import pickle
    err = driver.CudaError("cudaStreamEndCapture", 904, "streams [3] were not joined back")
    got = pickle.loads(pickle.dumps(err))
    assert type(got) is driver.CudaError and str(got) == str(err)
    assert (got.api, got.code, got.name) == (err.api, err.code, err.name)
