"""Benchmark patterns and schedules: every byte exactly once, collision properties, skew, parsing."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dwdp_comm import InvalidArgumentError
from dwdp_comm.bench import model as M
from dwdp_comm.bench.contention import count_wrong, fill_pattern
from dwdp_comm.bench.patterns import (PATTERNS, SCHEDULES, canonical_pattern, fill_options, make_plans,
                                      parse_option, parse_schedule, pattern_ranges, port_bound_time,
                                      recv_nbytes, sources)


def apply(plans, G, n):
    """Run every rank's plan on toy memories; return per-rank (dst, write count)."""
    src = [np.arange(n, dtype=np.int64) * 7 + r * 1_000_003 for r in range(G)]
    out = []
    for r, p in enumerate(plans):
        size = recv_nbytes_any(p)
        dst = np.full(size, -1, dtype=np.int64)
        cnt = np.zeros(size, dtype=np.int64)
        for _slot, s, so, do, nb in p.copies():
            dst[do:do + nb] = src[s][so:so + nb]
            cnt[do:do + nb] += 1
        out.append((dst, cnt))
    return out, src


def recv_nbytes_any(plan):
    return int((plan.dst_offset + plan.nbytes).max()) if len(plan) else 0


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(PATTERNS), st.sampled_from(sorted(SCHEDULES)), st.integers(2, 9), st.integers(1, 64),
       st.integers(0, 70))
def test_every_byte_exactly_once_from_the_right_source(pattern, schedule, G, n, chunk):
    plans = make_plans(pattern, parse_schedule(schedule), G, n, chunk)
    got, src = apply(plans, G, n)
    for r, (dst, cnt) in enumerate(got):
        srcs = sources(pattern, r, G)
        assert dst.shape[0] == recv_nbytes(pattern, r, G, n) == len(srcs) * n
        assert np.all(cnt == 1)
        for j, s in enumerate(srcs):
            assert np.array_equal(dst[j * n:(j + 1) * n], src[s])
        assert all(s != r for s in plans[r].src_rank.tolist())  # nothing local goes on the fabric
        if chunk:
            assert np.all(plans[r].nbytes <= chunk)


def _readers_per_slot(plans):
    """slot -> {rank: set of sources it reads in that slot}."""
    out = {}
    for r, p in enumerate(plans):
        for slot, s, *_ in p.copies():
            out.setdefault(slot, {}).setdefault(r, set()).add(s)
    return out


@pytest.mark.parametrize("G", [2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("chunk_div", [1, 3, 8])
def test_round_robin_lockstep_never_collides(G, chunk_div):
    n = 24 * 1024
    plans = make_plans("full", parse_schedule("round_robin"), G, n, n // chunk_div)
    for slot, readers in _readers_per_slot(plans).items():
        assert all(len(s) == 1 for s in readers.values())  # one source per rank per slot
        srcs = [next(iter(s)) for s in readers.values()]
        assert len(set(srcs)) == len(srcs), f"slot {slot}: two ranks read one source"
    # every peer is read in every round of G-1 slots
    for r, p in enumerate(plans):
        for k in range(0, p.num_slots, G - 1):
            seen = set(p.src_rank[(p.slot >= k) & (p.slot < k + G - 1)].tolist())
            assert seen == set(range(G)) - {r}


@pytest.mark.parametrize("G", [3, 4, 8])
def test_rotated_phases_are_permutations_and_naive_piles_up(G):
    plans = make_plans("full", parse_schedule("rotated"), G, 4096, 0)
    for slot, readers in _readers_per_slot(plans).items():
        srcs = [next(iter(s)) for s in readers.values()]
        assert sorted(srcs) == sorted(set(srcs)) and len(srcs) == G
    naive = make_plans("full", parse_schedule("naive"), G, 4096, 0)
    first = [int(p.src_rank[0]) for p in naive]
    assert first.count(0) == G - 1  # every rank but 0 reads source 0 first


def test_parallel_puts_each_source_on_its_own_lane():
    G = 5
    sch = parse_schedule("parallel")
    opts = sch.engine_options(G)
    assert opts["streams"] == G - 1
    plans = make_plans("full", sch, G, 1 << 20, 1 << 18)
    res = M.simulate(plans, M.h200(G).with_(max_streams=16), options=opts)
    r = res.records
    for rank in range(G):
        sel = r["rank"] == rank
        lanes = {}
        for lane, s in zip(r["lane"][sel].tolist(), r["src"][sel].tolist()):
            lanes.setdefault(lane, set()).add(s)
        assert len(lanes) == G - 1 and all(len(v) == 1 for v in lanes.values())


@pytest.mark.parametrize("schedule", ["naive", "rotated", "round_robin", "parallel", "batch", "tdm", "tdm_source"])
def test_skewed_starts_are_honoured_and_physics_holds(schedule, seed):
    G, n = 4, 32 << 20
    f = M.h200(G)
    rng = np.random.default_rng(seed)
    t_ideal = port_bound_time("full", G, n, f.pair_Bps)
    starts = rng.uniform(0, t_ideal, G)
    sch = parse_schedule(schedule)
    plans = make_plans("full", sch, G, n, 8 << 20)
    res = M.simulate(plans, f, options=sch.engine_options(G), starts=starts)
    r = res.records
    assert np.all(r["t_issue"] >= starts[r["rank"]] - 1e-15)
    # no rank receives faster than its ingress cap allows
    assert np.all(res.durations >= (G - 1) * n / f.ingress_Bps * (1 - 1e-9))
    # and the group cannot finish before the last rank could have alone
    assert res.ends.max() >= starts.max() + t_ideal * (1 - 1e-9)


def test_port_bound():
    n, bw, G = 1000, 10.0, 5
    assert port_bound_time("full", G, n, bw) == (G - 1) * n / bw
    assert port_bound_time("all-to-one", G, n, bw) == (G - 1) * n / bw
    assert port_bound_time("one-from-all", G, n, bw) == (G - 1) * n / bw
    assert port_bound_time("ring", G, n, bw) == n / bw
    assert port_bound_time("pair", G, n, bw) == n / bw


def test_pattern_names_and_sources():
    assert canonical_pattern("a2o") == "all-to-one" and canonical_pattern("one_from_all") == "one-from-all"
    assert canonical_pattern("FX") == "full"
    with pytest.raises(InvalidArgumentError, match="^pattern: got 'star'"):
        canonical_pattern("star")
    assert sources("ring", 3, 4) == [0]
    assert sources("all-to-one", 0, 4) == [] and sources("all-to-one", 2, 4) == [0]
    assert sources("swap", 2, 4) == []
    assert [r.dst_offset for r in pattern_ranges("full", 1, 4, 10)] == [0, 10, 20]
    with pytest.raises(InvalidArgumentError, match="^group_size"):
        sources("full", 0, 1)


def test_schedule_parsing():
    s = parse_schedule("round_robin+api=batch+streams=3")
    assert (s.policy, s.options) == ("round_robin", {"api": "batch", "streams": 3})
    s = parse_schedule("tdm+sync=source")
    assert (s.policy, s.options) == ("round_robin", {"sync": "source"})
    assert parse_schedule("parallel").engine_options(72)["streams"] == 71
    assert parse_schedule("batch").engine_options(4, {"streams": 2, "api": "memcpy"}) == {"streams": 2, "api": "batch"}
    assert fill_options({"streams": "all"}, 2) == {"streams": 1}
    assert parse_option("overlap_hint=true") == ("overlap_hint", True) and parse_option("streams=0x3") == ("streams", 3)
    for bad in ("", "fastest", "naive+streams"):
        with pytest.raises(InvalidArgumentError):
            parse_schedule(bad)


def test_byte_checker_counts_every_wrong_byte(seed):
    n = 4096 + 12
    src = torch.empty(n, dtype=torch.uint8)
    fill_pattern(src, 3, seed)
    assert count_wrong(src.clone(), 3, seed) == 0
    assert count_wrong(src.clone(), 2, seed) > n // 2  # another rank's pattern differs almost everywhere
    bad = src.clone()
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:7]
    bad[idx] ^= 0xFF
    assert count_wrong(bad, 3, seed) == 7
    with pytest.raises(InvalidArgumentError, match="multiple of 4"):
        fill_pattern(torch.empty(6, dtype=torch.uint8), 0, 0)
