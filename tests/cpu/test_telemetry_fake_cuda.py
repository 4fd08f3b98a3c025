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
    assert t_before <= timer.anchor_s <= time.perf_counter()
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
    assert timer.anchor_s <= ta < tb <= time.perf_counter()
    assert timer.elapsed(a, b) == pytest.approx(tb - ta) and timer.elapsed(a, b) >= 0.02
    # points are pooled: a freed event is reused by the next mark
    timer.free(a)
    assert timer.mark(stream=s.handle) == a
    assert fake.events[int(b)] and ("record", int(b), s.handle) in fake.log
    s.close()
