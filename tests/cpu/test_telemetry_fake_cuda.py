"""The GPU side of the telemetry on the fake CUDA runtime (tests/helpers/fake_cuda.py): the CUDA
timer's points (never blocking to mark, read back against its anchor, pooled) and the copy
executor's job timing (per source, inside the job, never changing what is copied)."""

import time

import numpy as np
import pytest

from dwdp_comm.backends.base import JobTiming
from dwdp_comm.backends.cuda import memory, streams
from dwdp_comm.backends.cuda.timing import CudaTimer
from tests.helpers import fake_cuda


@pytest.fixture
def fake(monkeypatch):
    return fake_cuda.install(monkeypatch)


def _hold(fake, stream):
    """Hold ``stream`` (a flag wait) until the returned flag is set to 1 and the fake progresses."""
    flag = np.zeros(1, dtype=np.uint64)
    fake.enqueue(stream, ("wait", flag.ctypes.data, 1, 64))
    return flag


def test_cuda_timer_points(fake):
    t_before = time.perf_counter()
    timer = CudaTimer()
    assert t_before <= timer.anchor_s <= time.perf_counter() and 0 <= timer.anchor_uncertainty_s
    s = streams.CudaStream()
    a = timer.mark(stream=s.handle)
    flag = _hold(fake, s.handle)
    b = timer.mark(stream=s.handle)  # behind the held wait: recorded, not passed
    assert timer.is_done(a) and not timer.is_done(b)
    time.sleep(0.02)
    flag[0] = 1
    fake.progress()
    assert timer.is_done(b)
    ta, tb = timer.seconds(a), timer.seconds(b)
    assert timer.anchor_s <= ta < tb <= time.perf_counter() + timer.anchor_uncertainty_s
    assert timer.elapsed(a, b) == pytest.approx(tb - ta) and timer.elapsed(a, b) >= 0.02
    # points are pooled: a freed event is reused by the next mark
    timer.free(a)
    assert timer.mark(stream=s.handle) == a
    assert fake.events[int(b)] and ("record", int(b), s.handle) in fake.log
    s.close()


@pytest.mark.parametrize("opts", [{"streams": 2}, {"streams": 1, "api": "memcpy"}, {"streams": 3, "distribute": "slot"}])
def test_executor_times_each_lane_without_changing_the_copies(fake, opts):
    from dwdp_comm import engine_options
    from dwdp_comm.backends.cuda import executor
    from dwdp_comm.planner import CopyRange, make_plan
    G, rank, n = 3, 1, 1 << 16
    rng = np.random.default_rng(0)
    heaps = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(G)]
    parsed = engine_options.parse_engine_options(opts, "test")
    assert parsed.pop("sync") == "none"  # time division is TimeDivisionExecutor's (as the backends build it)
    eng = executor.CopyExecutor(device=0, rank=rank, group_size=G, src_ptrs=[int(h.ctypes.data) for h in heaps],
                                src_nbytes=n, **parsed)
    assert eng.timed
    ranges = [CopyRange(0, 0, 0, 5000), CopyRange(2, 100, 6000, 7000), CopyRange(1, 300, 20000, 3000),
              CopyRange(0, 9000, 30000, 1234)]  # rank 1 reads itself too: the local lane
    plan = make_plan(ranges, rank=rank, group_size=G, chunk_nbytes=1024)
    timer = CudaTimer()
    logs, landed = {}, {}
    dst_data = np.zeros(n, dtype=np.uint8)
    dst = memory.DeviceBuffer(fake_cuda.HostAlloc(dst_data))
    for timed in (False, True):
        dst_data[:] = 0
        gate = streams.CudaStream()
        flag = _hold(fake, gate.handle)
        after = streams.CudaEvent().record(gate.handle)
        fake.log.clear()
        timing = JobTiming(timer) if timed else None
        done = eng.submit(plan, src_base=0, dst=dst, dst_base=0, after=[after], timing=timing)
        flag[0] = 1
        fake.progress()
        assert fake.events[done.handle][1], "the job did not complete"
        landed[timed] = dst_data.copy()
        logs[timed] = list(fake.log)
        gate.close()
        if not timed:
            continue
        # the same copies land with and without timing; only timing records were added
        assert np.array_equal(landed[True], landed[False])
        plain = [e for e in logs[True] if not (e[0] == "record" and e[1] in _points(timing))]
        assert [e[0] for e in plain if e[0] != "record"] == [e[0] for e in logs[False] if e[0] != "record"]
        lanes_used = {e[1] for e in logs[True] if e[0] in ("copy", "batch", "launch")}
        assert len(timing.start) == len(timing.end) == len(lanes_used)
        assert sorted(timing.sources) == [0, 1, 2]
        for s, (start, end, busy, lane) in timing.sources.items():
            assert busy is None
            for p in start:  # a start point: after the 'after' wait, before the lane's first copy
                i = logs[True].index(("record", int(p), _stream_of(logs[True], p)))
                st = _stream_of(logs[True], p)
                assert ("wait", st, after.handle) in logs[True][:i]
                assert not any(e[0] in ("copy", "batch", "launch") and e[1] == st for e in logs[True][:i])
            for p in end:  # an end point: after the lane's last copy, before the done event
                i = logs[True].index(("record", int(p), _stream_of(logs[True], p)))
                st = _stream_of(logs[True], p)
                assert not any(e[0] in ("copy", "batch", "launch") and e[1] == st for e in logs[True][i:])
                assert logs[True].index(("record", done.handle, logs[True][-1][2])) > i
            w0 = min(timer.seconds(p) for p in start)
            assert all(timer.seconds(p) >= w0 for p in end)
            if opts.get("distribute") != "slot":
                assert lane is not None and len(start) == 1  # one lane per source
        assert timing.sources[rank][3] == eng.local_lane
    # under capture (none here) and without timing, the executor records nothing extra
    assert sum(e[0] == "record" for e in logs[False]) < sum(e[0] == "record" for e in logs[True])
    eng.close()


def _points(timing):
    pts = {int(p) for p in timing.start + timing.end}
    for start, end, _, _ in timing.sources.values():
        pts |= {int(p) for p in start + end}
    return pts


def _stream_of(log, point):
    return next(e[2] for e in log if e[0] == "record" and e[1] == int(point))
