"""Slot-free prefetches on cuda_ipc (a group of one, composite mode): no copy job, no events per layer,
the right bytes, eager and under a captured forward."""
import pytest
import torch

import dwdp_comm as dc
from dwdp_comm.bench.split_weights import single_rank_group
from dwdp_comm.moe import DwdpPipeline

pytestmark = pytest.mark.gpu


def test_group_of_one_pipeline_makes_no_copy_jobs_and_no_timing_events(seed, monkeypatch):
    g = torch.Generator().manual_seed(seed)
    with single_rank_group("cuda_ipc") as group:
        if group.impl.map_granularity is None:
            pytest.skip("cuda_ipc without VMM here: every name in gather mode (copied), nothing slot-free")
        layout = dc.ExpertLayout(num_experts=8, group_size=1, rank=0)
        store = dc.WeightStore(group, layout)
        data = {}
        for layer in range(3):  # 8 experts of 256 KiB: 2 MiB blocks, composite mode on VMM pages
            data[layer] = torch.randn(8, 256, 256, generator=g).cuda()
            store.register(layer, "w13", data[layer])
        store.commit()
        with store, dc.Prefetcher(store, depth=2) as pf:
            pipe = DwdpPipeline(pf, [0, 1, 2])
            created = []

            class CountingEvent(torch.cuda.Event):
                def __new__(cls, *a, **kw):
                    created.append(1)
                    return super().__new__(cls, *a, **kw)
            monkeypatch.setattr(torch.cuda, "Event", CountingEvent)
            for _ in range(3):
                pipe.begin()
                for layer in (0, 1, 2):
                    h = pipe.acquire(layer)
                    assert torch.equal(h.weights("w13"), data[layer])
                    pipe.release(h)
            assert pf.engine.jobs == 0 and pf.nbytes_prefetched == 0
            assert created == [], "slot-free acquires made timing events"
            assert all(s["acquires"] == 3 and s["exposed_wait_s"] == 0.0 for s in pipe.layer_stats().values())
            pipe.prepare_capture()
            graph = torch.cuda.CUDAGraph()
            out = {}
            with torch.cuda.graph(graph):
                pipe.begin()
                for layer in (0, 1, 2):
                    h = pipe.acquire(layer)
                    out[layer] = h.weights("w13").sum(0)
                    pipe.release(h)
            for layer in range(3):
                store.local(layer, "w13").add_(1.0)  # rewritten in place: the heap rows the views map
            graph.replay()
            torch.cuda.synchronize()
            for layer in range(3):
                assert torch.allclose(out[layer], (data[layer] + 1.0).sum(0), atol=1e-3)
            pipe.close()
