"""Telemetry of a cuda_ipc pipeline (two ranks; they share a GPU where only one exists): bytes per
source as the layout says, copy windows of the copy lanes inside the job, exposed waits from CUDA
timing events on the compute stream (growing when the copies are held back), routing counts on
the device against a host count, and a valid trace of the run."""

import os

import pytest
import torch

import dwdp_comm as dc
from dwdp_comm.trace import chrome_trace
from tests.helpers import telemetry_rankfns as T

pytestmark = pytest.mark.gpu

TIMEOUT = float(os.environ.get("DWDP_TEST_TIMEOUT", "180"))
E = 5


@pytest.mark.parametrize("engine", [{}, {"streams": 2, "api": "memcpy"}, {"streams": 1, "api": "memcpy"}])
def test_pipeline_telemetry_cuda_ipc(engine, seed):
    res = dc.testing.launch(T.gpu_pipeline, 2, E, seed, engine, backend="cuda_ipc", timeout=TIMEOUT)
    eps = 2e-6  # timing events: about 0.5 us resolution
    for rank, out in enumerate(res):
        tel = out["tel"]
        assert tel.backend == "cuda_ipc" and tel.timed, "the GPU copy engine must time its copies"
        assert sum(r.nbytes for r in tel.prefetches) == out["nbytes_prefetched"]  # recorded from the first begin()
        assert [r.layer for r in tel.prefetches] == T.LAYERS * 2 + T.LAYERS[:2]
        for r in tel.prefetches:
            assert {s.src_rank: s.nbytes for s in r.sources} == out["expected"][r.layer]
            assert sum(s.nbytes for s in r.sources) == r.nbytes
            assert r.issue_s <= r.submit_s and r.start_s <= r.end_s and r.copy_s > 0
            for s in r.sources:
                assert r.start_s - eps <= s.start_s <= s.end_s <= r.end_s + eps and s.copy_s > 0
            if r.wait_start_s is not None:
                assert r.exposed_wait_s >= 0 and r.wait_start_s <= r.wait_end_s + eps <= r.release_s + 2 * eps
                assert r.wait_end_s + eps >= r.end_s  # the stream passed the wait only after the copies
        counts = {}
        for l, ids in out["routing_ids"]:
            t = torch.tensor(ids)
            c = counts.setdefault(l, [torch.zeros(E, dtype=torch.int64), 0])
            c[0] += torch.bincount(t[(t >= 0) & (t < E)], minlength=E)
            c[1] += t.shape[0]
        assert tel.routing.layers == {l: {"tokens": n, "counts": c.tolist()} for l, (c, n) in counts.items()}
    doc = chrome_trace([r["tel"] for r in res])
    assert {e["pid"] for e in doc["traceEvents"]} == {0, 1}
    assert {"compute", "prefetch", "copy"} <= {e.get("cat") for e in doc["traceEvents"]}


def test_exposed_wait_grows_when_copies_are_held(seed):
    res = dc.testing.launch(T.gpu_held_copies, 2, E, seed, backend="cuda_ipc", timeout=TIMEOUT)
    for out in res:
        free, held = out["tel"].prefetches
        assert free.layer == 0 and held.layer == 1
        assert 0 <= free.exposed_wait_s < held.exposed_wait_s
        assert held.exposed_wait_s >= 0.5 * out["sleep_s"], (held.exposed_wait_s, out["sleep_s"])
        assert held.start_s >= free.end_s  # the held copies began after the sleep, long after the first job
