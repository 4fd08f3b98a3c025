"""Slot-free prefetches: a layer whose every view lies in this rank's heap (a group of one, composite
mode) copies nothing and needs no events; the others still copy; the bytes delivered are right either way."""
import torch

import dwdp_comm as dc
from dwdp_comm.moe import DwdpPipeline
from dwdp_comm.bench.split_weights import single_rank_group


def _store(group, seed):
    g = torch.Generator().manual_seed(seed)
    layout = dc.ExpertLayout(num_experts=8, group_size=1, rank=0)
    store = dc.WeightStore(group, layout)
    data = {}
    for layer in range(3):
        data[layer, "w13"] = torch.randn(8, 32, 32, generator=g)  # 4 KiB an expert: composite (sim pages)
        store.register(layer, "w13", data[layer, "w13"])
    data[1, "scale"] = torch.randn(8, 3, generator=g)  # 12 bytes an expert: gather mode, copied into the slot
    store.register(1, "scale", data[1, "scale"])
    store.commit()
    return store, data


def _count_jobs(monkeypatch, pf) -> list:
    jobs, real = [], pf.engine.submit

    def submit(plan, **kw):
        jobs.append(plan.total_nbytes)
        return real(plan, **kw)
    monkeypatch.setattr(pf.engine, "submit", submit)
    return jobs


def test_group_of_one_copies_only_gather_mode_names(seed, monkeypatch):
    with single_rank_group("sim") as group:
        store, data = _store(group, seed)
        assert store.slot_mode(0, "w13") == "composite" and store.slot_mode(1, "scale") == "gather"
        with store, dc.Prefetcher(store, depth=2) as pf:
            jobs = _count_jobs(monkeypatch, pf)
            h = pf.prefetch(0)
            assert h.is_submitted and h.is_done and jobs == [] and pf.nbytes_prefetched == 0  # no copy job
            h.wait()
            assert torch.equal(h.weights("w13"), data[0, "w13"])
            assert torch.equal(h.weight_segments("w13")[0][1], data[0, "w13"])
            h.release()
            h1 = pf.prefetch(1)
            h1.wait()
            assert jobs == [data[1, "scale"].numel() * 4] == [pf.nbytes_prefetched]
            assert torch.equal(h1.weights("scale"), data[1, "scale"]) and torch.equal(h1.weights("w13"), data[1, "w13"])
            h1.release()


def test_pipeline_over_slot_free_and_copying_layers(seed, monkeypatch):
    with single_rank_group("sim") as group:
        store, data = _store(group, seed)
        with store, dc.Prefetcher(store, depth=2) as pf:
            jobs = _count_jobs(monkeypatch, pf)
            pipe = DwdpPipeline(pf, [0, 1, 2])
            for _ in range(4):
                pipe.begin()
                for layer in (0, 1, 2):
                    h = pipe.acquire(layer)
                    for name in store.names(layer):
                        assert torch.equal(h.weights(name), data[layer, name]), (layer, name)
                    pipe.release(h)
            stats = pipe.layer_stats()
            assert all(stats[l]["acquires"] == 4 for l in (0, 1, 2))
            assert len(jobs) == 5  # layer 1 only (its gather-mode scales): each forward, and once ahead
            pipe.close()
