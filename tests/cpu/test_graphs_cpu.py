"""The CUDA-graph capture path of the copy executor and the prefetcher, on the fake CUDA runtime
(tests/helpers/fake_cuda.py): under capture the batch call is never used, the copy streams fork
from and join into the capturing stream through events, a replay delivers the source's current
bytes, and every way of mixing eager and captured work raises GraphCaptureError."""

import numpy as np
import pytest

import dwdp_comm as dc
from dwdp_comm import engine_options
from dwdp_comm.backends.cuda import driver, executor, memory, streams, sync_flags, time_division
from dwdp_comm.planner import CopyRange, make_plan
from tests.helpers import fake_cuda


@pytest.fixture
def fake(monkeypatch):
    return fake_cuda.install(monkeypatch)


class _World:
    """One rank (1 of G) of host-memory heaps, a destination and an executor on the fake GPU."""

    def __init__(self, fake, seed, G=3, rank=1, n=1 << 15, **opts):
        self.fake, self.G, self.rank, self.n = fake, G, rank, n
        self.rng = np.random.default_rng(seed)
        self.heaps = [self.rng.integers(0, 256, n, dtype=np.uint8) for _ in range(G)]
        self.dst_data = np.zeros(n, dtype=np.uint8)
        self.dst = memory.DeviceBuffer(fake_cuda.HostAlloc(self.dst_data))
        self.eng = executor.CopyExecutor(device=0, rank=rank, group_size=G, src_ptrs=[int(h.ctypes.data) for h in self.heaps],
                                      src_nbytes=n, **{k: v for k, v in engine_options.parse_engine_options(
                                          opts, "test").items() if k != "sync"})
        # remote ranges from both peers and a local one (gather mode), chunked over several slots
        self.ranges = [CopyRange(0, 0, 0, 5000), CopyRange(2, 100, 6000, 7000), CopyRange(rank, 300, 20000, 3000),
                       CopyRange(2, 9000, 24000, 1234)]
        self.plan = make_plan(self.ranges, rank=rank, group_size=G, chunk_nbytes=1024)
        self.compute = streams.CudaStream()

    def check(self):
        for r in self.ranges:
            got = self.dst_data[r.dst_offset:r.dst_offset + r.nbytes]
            want = self.heaps[r.src_rank][r.src_offset:r.src_offset + r.nbytes]
            assert np.array_equal(got, want), r


@pytest.mark.parametrize("opts", [{"streams": 2}, {"streams": 1, "api": "memcpy"},
                                  {"streams": 3, "distribute": "slot"}])
def test_captured_job_is_memcpy_nodes_forked_and_joined(fake, seed, opts):
    w = _World(fake, seed, **opts)
    C = w.compute.handle
    cid = fake.begin_graph(C)
    fake.log.clear()
    fork = streams.CudaEvent().record(C, cid)
    done = w.eng.submit(w.plan, src_base=0, dst=w.dst, dst_base=0, after=[fork], capture=cid)
    assert done.capture == cid and w.eng.captured_jobs == 1
    assert not any(e[0] in ("batch", "batch-refused") for e in fake.log), \
        "under capture only single memcpy calls may run"
    lanes = sorted({e[1] for e in fake.log if e[0] == "copy"})
    assert len(lanes) >= 2  # peers' lane(s) and the local lane
    for lane in lanes:  # each copy lane forked from the capture before its first copy
        first = next(i for i, e in enumerate(fake.log) if e[0] == "copy" and e[1] == lane)
        assert ("wait", lane, fork.handle) in fake.log[:first]
    assert not w.dst_data.any(), "a captured copy ran at capture time"
    done.wait(stream=C)  # the consumer's wait joins every lane back
    graph = fake.end_graph(C)  # raises cudaErrorStreamCaptureUnjoined if a lane was left out
    assert len(graph.ops) == sum(1 for c in w.plan.copies() if c[4])
    for _ in range(3):  # every replay reads the sources as they are now
        for h in w.heaps:
            h[:] = w.rng.integers(0, 256, w.n, dtype=np.uint8)
        w.dst_data[:] = 0
        graph.replay()
        w.check()
    with pytest.raises(dc.GraphCaptureError, match="recorded during a CUDA graph capture"):
        done.synchronize()
    with pytest.raises(dc.GraphCaptureError):
        done.is_done
    with pytest.raises(dc.GraphCaptureError, match="eager copy job"):  # a captured event never orders eager work
        w.eng.submit(w.plan, src_base=0, dst=w.dst, dst_base=0, after=[done])
    w.eng.close()


def test_a_lane_left_unjoined_fails_the_capture(fake, seed):
    """The fake's end-of-capture check is real: without the consumer's wait the capture fails."""
    w = _World(fake, seed, streams=1, api="memcpy")
    C = w.compute.handle
    cid = fake.begin_graph(C)
    w.eng.submit(w.plan, src_base=0, dst=w.dst, dst_base=0, after=[streams.CudaEvent().record(C, cid)], capture=cid)
    with pytest.raises(driver.CudaError, match="not joined back"):
        fake.end_graph(C)


def test_captured_job_needs_events_of_its_capture(fake, seed):
    w = _World(fake, seed, streams=1)
    C = w.compute.handle
    eager = streams.CudaEvent().record(C)
    cid = fake.begin_graph(C)
    with pytest.raises(dc.GraphCaptureError, match="fork point"):
        w.eng.submit(w.plan, src_base=0, dst=w.dst, dst_base=0, after=[], capture=cid)
    with pytest.raises(dc.GraphCaptureError, match="fork point"):
        w.eng.submit(w.plan, src_base=0, dst=w.dst, dst_base=0, after=[eager], capture=cid)
    assert not any(e[0] == "copy" for e in fake.log), "a refused job issued copies"
    with pytest.raises(dc.GraphCaptureError, match="did not join"):  # an event of another capture: no fork
        other = streams.CudaStream()
        cid2 = fake.begin_graph(other.handle)
        ev = streams.CudaEvent().record(other.handle, cid2)
        ev.capture = cid  # lie about it: the executor checks that the lanes really joined
        w.eng.submit(w.plan, src_base=0, dst=w.dst, dst_base=0, after=[ev], capture=cid)


def test_sync_engine_and_unmapped_peers_refuse_capture(fake, seed):
    G = 2
    heaps = [np.zeros(1 << 12, dtype=np.uint8) for _ in range(G)]
    words = [np.zeros(sync_flags.SyncFlags.num_words("slot", G, 1), dtype=np.uint64) for _ in range(G)]
    flags = sync_flags.SyncFlags(mode="slot", rank=0, group_size=G, num_lanes=1, distribute="source", bits=64,
                            local_ptr=int(words[0].ctypes.data), peer_ptrs=[int(x.ctypes.data) for x in words])
    eng = time_division.TimeDivisionExecutor(device=0, rank=0, group_size=G,
                                             src_ptrs=[int(h.ctypes.data) for h in heaps], src_nbytes=1 << 12,
                                             sync="slot", flags=flags, api="memcpy")
    assert "sync='slot'" in eng.capture_refusal() and "not supported under CUDA graph capture" in eng.capture_refusal()
    dst = memory.DeviceBuffer(fake_cuda.HostAlloc(np.zeros(1 << 12, dtype=np.uint8)))
    plan = make_plan([CopyRange(1, 0, 0, 1024)], rank=0, group_size=G)
    s = streams.CudaStream()
    cid = fake.begin_graph(s.handle)
    with pytest.raises(dc.GraphCaptureError, match="sync='slot'.*not supported under CUDA graph capture"):
        eng.submit(plan, src_base=0, dst=dst, dst_base=0, after=[streams.CudaEvent().record(s.handle, cid)],
                   capture=cid)
    nv = executor.CopyExecutor(device=0, rank=0, group_size=G, src_ptrs=[int(heaps[0].ctypes.data), None],
                            src_nbytes=1 << 12, remote_get=lambda *a: None, sym_ptr=int(heaps[0].ctypes.data),
                            api="memcpy")
    assert "NVSHMEM" in nv.capture_refusal()


def test_capture_id_and_invalidated_capture(fake):
    s = streams.CudaStream()
    assert streams.stream_capture_id(s.handle) is None
    cid = fake.begin_graph(s.handle)
    assert streams.stream_capture_id(s.handle) == cid
    fake.seq[cid].invalid = True
    with pytest.raises(dc.GraphCaptureError, match="invalidated"):
        streams.stream_capture_id(s.handle)


# ---- the prefetcher and the pipeline under capture: sim heaps of 2 ranks, fake runtime -----------------
def test_pipeline_captured_replayed_and_mixed_with_eager(seed):
    from tests.helpers import graph_rankfns as gfns
    res = dc.testing.launch(gfns.captured_pipeline, 2, seed, backend="sim", timeout=180)
    for r in res:
        assert r["ok"]
        assert r["eager_batch_calls"] > 0, "the eager path should use the batch call (default api)"
        assert r["captured_batch_calls"] == 0
        assert r["captured_copies"] > 0 and r["forks"] >= 2  # peer lane and local lane forked
        assert r["sync_refused_cleanly"]


def test_example_cuda_graph_flag_refused_without_gpu():
    import os
    import subprocess
    import sys
    if dc.testing.gpu_count():
        pytest.skip("checks the refusal on machines without GPUs")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, os.path.join(root, "examples", "deepseek_layer.py"), "--size", "toy",
                          "--cuda-graph"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=root))
    assert run.returncode != 0 and "--cuda-graph needs a GPU and --mode dwdp" in run.stderr
