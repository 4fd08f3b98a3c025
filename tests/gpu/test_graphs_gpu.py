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
    ({"api": "memcpy", "streams": 2}, {}),  # single copies on two lanes eagerly, memcpy nodes under capture
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


def _experts_inputs(dtype, seed, E=8, T=96, H=64, I=32, k=2):
    import torch
    g = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda", 0)
    gu = torch.randn(E, 2 * I, H, generator=g).to(dev, dtype)
    dn = torch.randn(E, H, I, generator=g).to(dev, dtype)
    x = torch.randn(T, H, generator=g).to(dev, dtype)
    idx = torch.randint(0, E, (T, k), generator=g).to(dev)
    w = torch.rand(T, k, generator=g).to(dev)
    return x, idx, w, gu, dn


def test_experts_forward_captured_equals_eager(seed):
    """bf16 weights in one tensor: experts_forward captured once and replayed on new inputs and
    routings gives exactly the eager result (no host count anywhere in the captured path)."""
    import torch
    from dwdp_comm import moe
    if dc.testing.gpu_count() < 1 or torch.cuda.get_device_capability(0)[0] not in (9, 10):
        pytest.skip("needs an sm90 / sm100 GPU (torch._grouped_mm's bf16 kernel)")
    x, idx, w, gu, dn = _experts_inputs(torch.bfloat16, seed)
    sx, sidx, sw = x.clone(), idx.clone(), w.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the capability probes run here, eagerly
        moe.experts_forward(sx, sidx, sw, gu, dn)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sy = moe.experts_forward(sx, sidx, sw, gu, dn)
    for i in range(5):
        x, idx, w, _, _ = _experts_inputs(torch.bfloat16, seed + 1 + i)
        sx.copy_(x), sidx.copy_(idx), sw.copy_(w)
        graph.replay()
        want = moe.experts_forward(x, idx, w, gu, dn)
        torch.cuda.synchronize()
        assert torch.equal(sy, want), f"replay {i}: max |diff| {float((sy - want).abs().max())}"


@pytest.mark.parametrize("form", ["float32", "split"])
def test_experts_forward_needing_host_counts_refuses_capture(form, seed):
    """Paths that need token counts on the host (float32 per-expert GEMMs, separate weight pieces)
    run eagerly but raise GraphCaptureError under capture, before any illegal call: the capture
    ends cleanly and the stream works afterwards."""
    import torch
    from dwdp_comm import moe
    if dc.testing.gpu_count() < 1:
        pytest.skip("needs a CUDA GPU")
    x, idx, w, gu, dn = _experts_inputs(torch.float32 if form == "float32" else torch.bfloat16, seed)
    if form == "split":
        gu, dn = [(0, gu[:4].clone()), (4, gu[4:].clone())], [(0, dn[:4].clone()), (4, dn[4:].clone())]
    want = moe.experts_forward(x, idx, w, gu, dn)  # eager: fine (and the warm-up)
    ref = moe.experts_forward_reference(x, idx, w, torch.cat([p for _, p in gu]) if form == "split" else gu,
                                        torch.cat([p for _, p in dn]) if form == "split" else dn)
    assert float((want.float() - ref.float()).abs().max()) <= 0.05 * float(ref.float().abs().max())
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(dc.GraphCaptureError, match="host") as e:
        with torch.cuda.graph(graph):
            moe.experts_forward(x, idx, w, gu, dn)
    assert ("separate weight pieces" if form == "split" else "per-expert") in str(e.value)
    again = moe.experts_forward(x, idx, w, gu, dn)
    torch.cuda.synchronize()
    assert torch.equal(again, want)
