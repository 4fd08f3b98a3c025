"""``stream`` is keyword-only on every public call and accepted (ignored) on sim, so the same user
code runs on sim and on a GPU."""
import inspect

import pytest

import dwdp_comm as dc
from tests.helpers import prefetch_rankfns
from dwdp_comm.backends import base, sim
from dwdp_comm.backends.cuda import backend as cuda_backend
from dwdp_comm.backends.cuda import streams as cuda_streams
from dwdp_comm.interop import cupy as dcp
from dwdp_comm.interop import torch as dtorch


def test_gpu_idiom_runs_on_sim(seed):
    res = dc.testing.launch(prefetch_rankfns.stream_keyword, 2, 6, seed, timeout=120)
    for r in res:
        assert r["done"] is True
        assert len(r["positional"]) == 5 and all(p is not None and "positional argument" in p
                                                 for p in r["positional"]), r["positional"]


@pytest.mark.parametrize("fn", [
    dc.PrefetchHandle.wait, dc.PrefetchHandle.release, dc.Prefetcher.capture_id,
    base.Event.wait, base.Backend.record_event, base.Backend.capture_id,
    sim.SimEvent.wait, sim.SimBackend.record_event,
    cuda_streams.CudaEvent.wait, cuda_backend.CudaBackendBase.record_event, cuda_backend.CudaBackendBase.capture_id,
    dtorch.stream_wait, dcp.stream_wait,
], ids=lambda f: f.__qualname__)
def test_stream_is_keyword_only(fn):
    p = inspect.signature(fn).parameters["stream"]
    assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None
