"""DWDP under CUDA graphs on a GPU (cuda_ipc, two ranks; they may share one GPU: rank r uses GPU
r % device_count): a multi-layer forward captured in one torch.cuda.graph and replayed 100 times
with new inputs and, every 10 replays, new source weights on every rank; every delivered byte and
every output are checked against an eager reference, and eager forwards of the same pipeline run
before, between and after the replays.

One command (also what ``perf/run_device.sh``'s ``graphs`` step should run)::

    python3 -m pytest -q -p no:cacheprovider tests/gpu/test_graphs_gpu.py
"""

import os

import pytest

import dwdp_comm as dc
from tests.helpers import gpu_rankfns as fns

pytestmark = pytest.mark.gpu

TIMEOUT = float(os.environ.get("DWDP_TEST_TIMEOUT", "300"))


@pytest.mark.parametrize("engine, options", [
    ({}, {}),  # default api='batch' eagerly: the capture must switch to memcpy nodes by itself
    ({"graph": True, "streams": 2}, {}),  # the engine's own graphs eagerly; the caller's graph's nodes under capture
    ({}, {"vmm": False}),  # legacy IPC: every tensor in gather mode (local copies on the local lane)
])
def test_captured_forward_replayed_100_times(engine, options, seed):
    if dc.testing.gpu_count() < 1:
        pytest.skip("needs a CUDA GPU")
    res = dc.testing.launch(fns.graph_replay, 2, 5, 3, 2, 100, seed, engine, 10, backend="cuda_ipc",
                            options=options, timeout=TIMEOUT)
    for r in res:
        assert r["captured_jobs"] == 3, "one captured copy job per layer"
        assert r["versions"] == 9, "the source weights changed between replays"
        replays = [c for c in r["checks"] if c["what"].startswith("replay")]
        assert len(replays) == 100
        for c in r["checks"]:
            assert c["wrong_bytes"] == 0, c
            assert c["max_abs_err"] <= 1e-4, c  # same kernels on the same bytes; bitwise is reported
        if options.get("vmm") is False:
            assert set(r["modes"].values()) == {"gather"}
    print(f"cuda_ipc x2 on {dc.testing.gpu_count()} GPU(s): mode={res[0]['mode']} api={res[0]['api']} "
          f"modes={res[0]['modes']} bitwise outputs: "
          f"{sum(c['bitwise'] for r in res for c in r['checks'])}/{sum(len(r['checks']) for r in res)}")
