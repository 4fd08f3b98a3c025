"""Telemetry on the sim backend: every field of the records (bytes add up to the plan, per-peer bytes
match the layout, times ordered, exposed wait >= 0 and growing when a peer is slowed), routing
histograms against a host count, off means no records and no cost, and the toggles."""

import json

import pytest
import torch

import dwdp_comm as dc
from dwdp_comm.routing_histogram import RoutingHistogram
from dwdp_comm.telemetry import Telemetry
from tests.helpers import telemetry_rankfns as T

E = 7  # uneven over 3 ranks


def _host_counts(ids_list, layer):
    c = torch.zeros(E, dtype=torch.int64)
    tokens = 0
    for l, ids in ids_list:
        ids = torch.tensor(ids)
        if l == layer:
            valid = ids[(ids >= 0) & (ids < E)]
            c += torch.bincount(valid, minlength=E)
            tokens += ids.shape[0]
    return c.tolist(), tokens


def _check_record(r, rank, expected, eps=1e-9):
    assert r.rank == rank
    # bytes add up to the plan, and per source they are what the layout says
    assert sum(s.nbytes for s in r.sources) == r.nbytes
    assert {s.src_rank: s.nbytes for s in r.sources} == expected[r.layer]
    assert [s.src_rank for s in r.sources] == sorted(expected[r.layer])
    # times: issued, submitted, copied, waited for, released, in that order
    assert r.issue_s <= r.submit_s <= r.start_s + eps
    assert r.start_s <= r.end_s and r.copy_s == pytest.approx(r.end_s - r.start_s) and r.copy_s > 0
    assert r.gbps == pytest.approx(r.nbytes / r.copy_s / 1e9)
    for s in r.sources:
        assert r.start_s - eps <= s.start_s <= s.end_s <= r.end_s + eps  # inside the job's window
        assert 0 < s.copy_s <= s.end_s - s.start_s + eps  # busy time, within its window
        assert s.gbps == pytest.approx(s.nbytes / s.copy_s / 1e9) and s.lane == 0
    assert r.exposed_wait_s >= 0
    assert r.wait_start_s <= r.wait_end_s <= r.release_s
    assert r.exposed_wait_s == pytest.approx(r.wait_end_s - r.wait_start_s)
    assert r.wait_end_s + eps >= r.end_s  # sim: the host waits until the copy thread finished
    assert r.error is None and r.label is None and r.name == f"L{r.layer}"


def test_every_field_on_sim(seed):
    res = dc.testing.launch(T.fields, 3, E, seed, timeout=180)
    for rank, out in enumerate(res):
        tel, late = out["tel"], out["late"]
        assert isinstance(tel, Telemetry) and tel.rank == rank and tel.group_size == 3 and tel.backend == "sim"
        assert tel.timed and tel.dropped == 0 and tel.cancelled == 0
        assert out["inside"] and not out["after"]
        # released handles only: two forwards of every layer, in prefetch order
        assert [r.layer for r in tel.prefetches] == T.LAYERS * 2
        assert [r.seq for r in tel.prefetches] == list(range(6))
        assert [r.slot for r in tel.prefetches] == [i % 2 for i in range(6)]
        for r in tel.prefetches:
            _check_record(r, rank, out["expected"])
        # the next forward's first two layers were in flight at telemetry(): reported once released
        assert [r.layer for r in late.prefetches] == T.LAYERS * 2 + T.LAYERS[:2]
        extra = late.prefetches[6:]
        assert [r.seq for r in extra] == [6, 7]
        for r in extra:  # released without a wait (pipe.close()): copies timed, no wait
            assert r.exposed_wait_s is None and r.wait_start_s is None and r.release_s is not None
            assert sum(s.nbytes for s in r.sources) == r.nbytes
        # every byte the prefetcher counted is in a record
        assert sum(r.nbytes for r in late.prefetches) == out["nbytes_prefetched"]
        # per-layer sums and the one-line summaries
        layers = tel.layers()
        assert sorted(layers) == sorted(T.LAYERS)
        for l, a in layers.items():
            recs = [r for r in tel.prefetches if r.layer == l]
            assert a["prefetches"] == 2 and a["nbytes"] == sum(r.nbytes for r in recs)
            assert a["exposed_wait_s"] == pytest.approx(sum(r.exposed_wait_s for r in recs))
            assert a["max_exposed_wait_s"] == max(r.exposed_wait_s for r in recs)
            assert {s: v["nbytes"] for s, v in a["sources"].items()} == {s: 2 * n for s, n in out["expected"][l].items()}
        lines = tel.summary_lines()
        assert len(lines) == 3 and all(f"layer {l}:" in line for l, line in zip(sorted(T.LAYERS), lines))
        assert all(r.summary().startswith(f"L{r.layer} (prefetch {r.seq}, slot {r.slot})") for r in tel.prefetches)
        # routing: the device counts are the host's count of the valid ids passed to acquire()
        h = tel.routing
        assert isinstance(h, RoutingHistogram) and h.num_experts == E and h.top_k == 3 and h.ranks == (rank,)
        for l in T.LAYERS:
            counts, tokens = _host_counts(out["routing_ids"], l)
            assert h.layers[l] == {"tokens": tokens, "counts": counts}
        # JSON round trip
        doc = json.loads(json.dumps(tel.as_dict()))
        back = Telemetry.from_dict(doc)
        assert back == tel


def test_slow_peer_shows_in_its_copy_time_and_the_exposed_wait(seed):
    bw = 4e5  # bytes/s from one peer; that peer's ~8-10 KB per prefetch then take >= 20 ms
    res = dc.testing.launch(T.fields, 3, E, seed, bw, timeout=180)
    for rank, out in enumerate(res):
        tel, slow = out["tel"], out["slow"]
        total_slow = 0.0
        for r in tel.prefetches:
            _check_record(r, rank, out["expected"])
            (s,) = [s for s in r.sources if s.src_rank == slow]
            # the throttle sleeps each chunk to at least nbytes / bw: a lower bound by construction
            assert s.copy_s >= s.nbytes / bw * 0.999
            assert s.gbps <= bw / 1e9 * 1.001
            total_slow += s.nbytes / bw
        # nothing computes between layers here, so the consumer waits for (about) every copy
        waited = sum(r.exposed_wait_s for r in tel.prefetches)
        assert waited >= 0.5 * total_slow, (waited, total_slow)


def test_off_means_no_records_and_no_cost_then_toggles(seed):
    res = dc.testing.launch(T.off_and_toggles, 2, E, seed, timeout=180)
    for out in res:
        # never enabled: the engine was never asked to time, the clock never taken, nothing recorded
        assert out["off_records"] == 0 and out["off_routing"] is None and not out["off_timed"]
        assert out["off_kwargs"] and all("timing" not in kw for kw in out["off_kwargs"])
        assert out["off_timer_calls"] == 0 and not out["off_enabled"]
        # enabled: every submit timed; disabled again: none
        assert out["on_kwargs"] and all("timing" in kw for kw in out["on_kwargs"])
        assert out["disabled_kwargs"] and all("timing" not in kw for kw in out["disabled_kwargs"])
        # recorded: the prefetches issued while enabled: the forward's last layer (its first two were
        # issued during the previous forward) and the next forward's first two (issued during it);
        # none issued after disable_telemetry(); no routing was asked
        assert out["on_layers"] == T.LAYERS[2:] + T.LAYERS[:2]
        assert out["on_routing"] is None and out["after_reset"] == 0
        # max_records=2: the newest two kept, the rest counted as dropped
        assert len(out["capped"]) == 2 and out["capped"] == sorted(out["capped"]) and out["dropped"] == 6
        # a prefetch released before its slot came free never ran: counted, not recorded
        assert out["cancelled"] == 1 and out["cancel_layers"] == T.LAYERS[:2]
        assert out["cancel_waited"] == [True, False]
        assert [k for k, _ in out["errors"]] == ["InvalidArgumentError"] * 2 + ["InvalidTypeError"] * 2
        assert all(m.startswith("max_records: ") for _, m in out["errors"])
        assert out["bw_error"].startswith("source_bandwidth: ")
