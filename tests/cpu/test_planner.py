import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dwdp_comm import CopyRange, InvalidArgumentError, make_plan, policies
from dwdp_comm.planner import PlanCache

POLICIES = ["naive", "rotated", "round_robin"]


@st.composite
def needs(draw):
    """A rank's needs: random ranges from random sources into disjoint destinations."""
    g = draw(st.integers(1, 8))
    rank = draw(st.integers(0, g - 1))
    n = draw(st.integers(0, 12))
    ranges, dst = [], 0
    for _ in range(n):
        src = draw(st.integers(0, g - 1))
        size = draw(st.integers(0, 300))
        src_off = draw(st.integers(0, 2000))
        dst += draw(st.integers(0, 20))  # gaps between destinations
        ranges.append(CopyRange(src, src_off, dst, size))
        dst += size
    draw(st.randoms()).shuffle(ranges)
    return g, rank, ranges


def apply(plan, g):
    """Run a plan on toy memories; return (dst bytes, write count per dst byte)."""
    src = [(np.arange(4096, dtype=np.int64) * 7 + r * 100_000) for r in range(g)]
    dst = np.full(8192, -1, dtype=np.int64)
    count = np.zeros(8192, dtype=np.int64)
    for _slot, s, so, do, n in plan.copies():
        dst[do:do + n] = src[s][so:so + n]
        count[do:do + n] += 1
    return dst, count, src


@settings(max_examples=300, deadline=None)
@given(needs(), st.sampled_from(POLICIES), st.integers(1, 128))
def test_every_byte_once(case, policy, chunk):
    g, rank, ranges = case
    plan = make_plan(ranges, rank=rank, group_size=g, policy=policy, chunk_nbytes=chunk)
    dst, count, src = apply(plan, g)
    want = np.zeros_like(count)
    for r in ranges:
        want[r.dst_offset:r.dst_offset + r.nbytes] = 1
        assert np.array_equal(dst[r.dst_offset:r.dst_offset + r.nbytes], src[r.src_rank][r.src_offset:r.src_offset + r.nbytes])
    assert np.array_equal(count, want)  # every needed byte exactly once, nothing else written
    assert plan.total_nbytes == sum(r.nbytes for r in ranges)
    assert np.all(np.diff(plan.slot) >= 0)  # issue order follows slots
    assert np.all(plan.nbytes > 0) and np.all(plan.nbytes <= chunk)
    # A chunk never exceeds chunk_nbytes even when it spans several ranges.
    per = {}
    for slot, s, _, _, n in plan.copies():
        per[(slot, s)] = per.get((slot, s), 0) + n
    assert all(v <= chunk for v in per.values())
    # Local copies (src == rank) come after every remote copy.
    local = plan.src_rank == rank
    if local.any() and (~local).any():
        assert plan.slot[local].min() > plan.slot[~local].max()


@st.composite
def exchanges(draw):
    """A full exchange: every rank pulls a random amount from every peer (uneven shards)."""
    g = draw(st.integers(2, 9))
    sizes = [[0 if s == d else draw(st.integers(0, 600)) for s in range(g)] for d in range(g)]
    return g, sizes


@settings(max_examples=200, deadline=None)
@given(exchanges(), st.integers(16, 256))
def test_round_robin_lockstep_never_collides(case, chunk):
    g, sizes = case
    readers = {}  # slot -> sources read in that slot, over all ranks
    for d in range(g):
        ranges, dst = [], 0
        for s in range(g):
            if sizes[d][s]:
                ranges.append(CopyRange(s, 0, dst, sizes[d][s]))
                dst += sizes[d][s]
        plan = make_plan(ranges, rank=d, group_size=g, policy="round_robin", chunk_nbytes=chunk)
        mine = {}
        for slot, s, *_ in plan.copies():
            mine.setdefault(slot, set()).add(s)
        for slot, srcs in mine.items():
            assert len(srcs) == 1, "a rank reads one source per slot"
            readers.setdefault(slot, []).extend(srcs)
    for slot, srcs in readers.items():
        assert len(srcs) == len(set(srcs)), f"slot {slot}: sources {srcs} collide"


def test_policy_orders():
    g, rank = 4, 1
    ranges = [CopyRange(s, 0, s * 100, 100) for s in range(g) if s != rank]
    first_src = lambda p: [s for _, s, *_ in make_plan(ranges, rank=rank, group_size=g, policy=p, chunk_nbytes=50).copies()]
    assert first_src("naive") == [0, 0, 2, 2, 3, 3]
    assert first_src("rotated") == [2, 2, 3, 3, 0, 0]
    assert first_src("round_robin") == [2, 3, 0, 2, 3, 0]


def test_coalesces_contiguous_ranges():
    ranges = [CopyRange(1, 0, 0, 10), CopyRange(1, 10, 10, 10), CopyRange(1, 20, 30, 10)]
    plan = make_plan(ranges, rank=0, group_size=2, policy="naive", chunk_nbytes=1000)
    assert list(plan.copies()) == [(0, 1, 0, 0, 20), (0, 1, 20, 30, 10)]


def test_empty_and_local_only():
    assert len(make_plan([], rank=0, group_size=1)) == 0
    plan = make_plan([CopyRange(0, 0, 0, 10)], rank=0, group_size=1, chunk_nbytes=4)
    assert plan.nbytes.tolist() == [4, 4, 2] and plan.num_slots == 3


@pytest.mark.parametrize("kwargs, arg", [
    (dict(policy="best"), "policy"),
    (dict(chunk_nbytes=0), "chunk_nbytes"),
    (dict(chunk_nbytes=-1), "chunk_nbytes"),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(InvalidArgumentError, match=f"^{arg}: got"):
        make_plan([CopyRange(1, 0, 0, 4)], rank=0, group_size=2, **kwargs)


def test_bad_ranges():
    with pytest.raises(InvalidArgumentError, match="src_rank"):
        make_plan([CopyRange(2, 0, 0, 4)], rank=0, group_size=2)
    with pytest.raises(InvalidArgumentError, match="non-overlapping"):
        make_plan([CopyRange(1, 0, 0, 4), CopyRange(1, 8, 2, 4)], rank=0, group_size=2)


def test_plan_arrays_are_read_only():
    plan = make_plan([CopyRange(1, 0, 0, 4)], rank=0, group_size=2)
    with pytest.raises(ValueError):
        plan.nbytes[0] = 1


def test_policies_listed():
    assert set(POLICIES) <= set(policies())


def test_plan_cache_reuses():
    cache = PlanCache(maxsize=2)
    built = []
    build = lambda: built.append(1) or make_plan([], rank=0, group_size=1)
    a = cache.get("a", build)
    assert cache.get("a", build) is a and len(built) == 1
    cache.get("b", build), cache.get("c", build)  # evicts "a"
    cache.get("a", build)
    assert len(built) == 4 and cache.hits == 1 and cache.misses == 4


@pytest.fixture
def scratch_policies():
    """Policies registered by a test are removed afterwards."""
    from dwdp_comm import planner
    before = dict(planner._POLICIES)
    yield
    planner._POLICIES.clear()
    planner._POLICIES.update(before)


def test_register_custom_policy(scratch_policies):
    from dwdp_comm import register_policy

    @register_policy("descending")
    def descending(num_chunks, rank, group_size):
        out, t = {}, 0
        for s in sorted(num_chunks, reverse=True):
            out[s] = np.arange(t, t + num_chunks[s], dtype=np.int64)
            t += num_chunks[s]
        return out

    assert "descending" in policies()
    ranges = [CopyRange(s, 0, s * 100, 100) for s in range(4) if s != 1]
    plan = make_plan(ranges, rank=1, group_size=4, policy="descending", chunk_nbytes=50)
    assert plan.policy == "descending"
    assert plan.src_rank.tolist() == [3, 3, 2, 2, 0, 0]
    assert plan.slot.tolist() == list(range(6))
    with pytest.raises(InvalidArgumentError, match="^name: got 'descending'"):
        register_policy("descending")(descending)
    register_policy("descending", replace=True)(descending)
    with pytest.raises(InvalidArgumentError, match="^name: got ''"):
        register_policy("")


@pytest.mark.parametrize("slots", [
    lambda n: np.zeros(n, dtype=np.int64),          # not increasing
    lambda n: np.arange(n + 1, dtype=np.int64),     # wrong length
    lambda n: np.arange(n, dtype=np.int64) - 5,     # negative
])
def test_bad_custom_policy_is_reported(scratch_policies, slots):
    from dwdp_comm import register_policy
    register_policy("broken")(lambda num_chunks, rank, g: {s: slots(n) for s, n in num_chunks.items()})
    with pytest.raises(InvalidArgumentError, match="^policy: got 'broken', expected a policy that gives"):
        make_plan([CopyRange(1, 0, 0, 200)], rank=0, group_size=2, policy="broken", chunk_nbytes=50)


def test_policy_missing_a_source_is_reported(scratch_policies):
    from dwdp_comm import register_policy
    register_policy("forgetful")(lambda num_chunks, rank, g: {})
    with pytest.raises(InvalidArgumentError, match="source 1 has none"):
        make_plan([CopyRange(1, 0, 0, 200)], rank=0, group_size=2, policy="forgetful")


def test_planner_benchmark_runs(tmp_path):
    """perf/bench_planner.py: DeepSeek-V3-sized layers, every policy; a planner 100x slower fails."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    out = tmp_path / "planner.json"
    p = subprocess.run([sys.executable, "-m", "perf.bench_planner", "--seconds", "0.02", "--json", str(out),
                        "--min-plans-per-s", "5"], capture_output=True, text=True, timeout=240, cwd=root)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    assert doc["meta"]["experts"] == 256 and doc["meta"]["tensors"] == 3
    assert {r["policy"] for r in doc["rows"]} == {"naive", "rotated", "round_robin"}
    assert {r["group_size"] for r in doc["rows"]} == {4, 8}
    assert all(r["plans_per_s"] > 0 for r in doc["rows"])
    assert "plans/s" in p.stdout
