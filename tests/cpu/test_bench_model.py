"""The copy-plane model: calibration, max-min rates, and the semantics of each mechanism."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dwdp_comm import InvalidArgumentError, InvalidTypeError
from dwdp_comm.bench import calibrate as C
from dwdp_comm.bench import model as M
from dwdp_comm.bench.patterns import make_plans, parse_schedule, port_bound_time

MiB, GiB = 1 << 20, 1 << 30


def run(pattern, schedule, G=4, n=256 * MiB, chunk=0, fabric=None, starts=None, **kw):
    sch = parse_schedule(schedule)
    fabric = fabric or M.h200(G)
    plans = make_plans(pattern, sch, G, n, chunk)
    res = M.simulate(plans, fabric, options=sch.engine_options(G, kw.pop("options", None)), starts=starts, **kw)
    return res, plans, fabric


def agg(res, plans):
    return sum(p.total_nbytes for p in plans) / res.makespan


# ---- calibration ----------------------------------------------------------------------------------
def test_every_calibration_row_within_claimed_tolerance():
    cal = C.load_calibration()
    rows = C.compare()
    assert [r["id"] for r in rows] == [r["id"] for r in cal["rows"]]  # every measured row is compared
    assert len(rows) >= 12
    for r in rows:
        assert abs(r["error"]) <= C.CLAIMED_TOLERANCE, r


def test_calibration_json_has_its_source():
    cal = C.load_calibration()
    assert "DEVICE_NOTES.md" in cal["source"] and cal["group_size"] == 4
    for r in cal["rows"]:
        assert r["measured_GBps"] > 0 and r["nbytes_per_source"] == GiB


def test_plain_fair_sharing_cannot_explain_the_drift_rows():
    """The reason the calibration needs the issue-FIFO executor: a fair-share fluid model puts the
    rotated and round-robin rows near the ideal, far from what was measured."""
    cal = {r["id"]: r for r in C.load_calibration()["rows"]}
    r = cal["full_rotated"]
    got, _ = C._case_GBps(M.h200(4), r["pattern"], r["schedule"], r["nbytes_per_source"], r["chunk_nbytes"],
                          r["engine_options"], "per_stream")
    assert got > 2 * r["measured_GBps"]


# ---- max-min rates --------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=25),
       st.lists(st.floats(1.0, 100.0), min_size=12, max_size=12))
def test_maxmin_feasible_and_every_flow_bottlenecked(G, pairs, capvals):
    pairs = [(s % G, d % G) for s, d in pairs]
    caps = np.array(capvals[:2 * G])
    ports = np.array([[s, G + d] for s, d in pairs], dtype=np.int64)
    rate = M.maxmin_rates(ports, caps)
    load = np.zeros(2 * G)
    np.add.at(load, ports.ravel(), np.repeat(rate, 2))
    assert np.all(load <= caps * (1 + 1e-9))
    assert np.all(rate > 0)
    # max-min: each flow crosses a saturated port where it has the largest rate
    for f, (s, d) in enumerate(pairs):
        ok = False
        for p in (s, G + d):
            users = [g for g in range(len(pairs)) if p in ports[g]]
            if load[p] >= caps[p] * (1 - 1e-9) and rate[f] >= max(rate[users]) * (1 - 1e-9):
                ok = True
        assert ok, (f, pairs, rate)


def test_maxmin_ignores_missing_ports():
    rate = M.maxmin_rates(np.array([[0, -1], [0, 1]]), np.array([10.0, 4.0]))
    assert rate.tolist() == pytest.approx([6.0, 4.0])


# ---- shapes of the answer -------------------------------------------------------------------------
def test_pair_and_single_port_patterns_run_at_the_pair_rate():
    f = M.h200(4)
    for pattern in ("pair", "all-to-one", "one-from-all"):
        opts = {"streams": 3} if pattern == "one-from-all" else None
        res, plans, _ = run(pattern, "naive", options=opts)
        assert agg(res, plans) == pytest.approx(M.pair_rate(f, 256 * MiB), rel=0.01), pattern


@pytest.mark.parametrize("G", [2, 4, 8])
def test_ring_is_about_G_times_pair(G):
    res, plans, f = run("ring", "naive", G=G)
    ratio = agg(res, plans) / (G * M.pair_rate(f, 256 * MiB))
    assert 0.95 <= ratio <= 1.0 + 1e-9  # the duplex cap takes ~2 %


@pytest.mark.parametrize("schedule", ["naive", "rotated", "round_robin", "parallel", "tdm"])
def test_faster_caps_never_slow_it_down(schedule):
    base = M.h200(4)
    t = []
    for k in (1.0, 1.5, 3.0):
        f = base.with_(egress_Bps=base.egress_Bps * k, ingress_Bps=base.ingress_Bps * k,
                       duplex_Bps=base.duplex_Bps * k)
        res, _, _ = run("full", schedule, fabric=f, chunk=32 * MiB)
        t.append(res.makespan)
    assert t[0] >= t[1] >= t[2]


def test_overheads_add_per_copy():
    f = M.h200(4)
    n, k = 64 * MiB, 16
    for opts, over in [({}, k * f.copy_overhead_s),
                       ({"api": "batch"}, f.batch_call_overhead_s + k * f.batch_copy_overhead_s)]:
        res, _, _ = run("pair", "naive", n=n, chunk=n // k, options=opts)
        assert res.makespan == pytest.approx(over + n / f.pair_Bps, rel=1e-9), opts


def test_permutation_schedules_reach_the_port_bound_in_lockstep():
    f = M.h200(4)
    t_ideal = port_bound_time("full", 4, 256 * MiB, f.pair_Bps)
    for sched in ("rotated", "parallel", "tdm"):
        res, _, _ = run("full", sched)
        assert t_ideal / res.makespan > 0.95, sched
    res, _, _ = run("full", "naive")
    assert t_ideal / res.makespan < 0.6  # every rank reads source 0 first


def test_group_size_72_runs():
    f = M.nvl72()
    assert f.group_size == 72 and 700e9 < f.egress_Bps < 900e9
    res, plans, _ = run("full", "rotated", G=72, n=128 * MiB, fabric=f)  # 71 copies of 128 MiB per rank
    assert 0.9 < port_bound_time("full", 72, 128 * MiB, f.pair_Bps) / res.makespan <= 1.0


# ---- semantics, read off the per-copy records -----------------------------------------------------
def _check_records(res, plans):
    r = res.records
    assert np.all(r["t_issue"] <= r["t_data"] + 1e-15) and np.all(r["t_data"] <= r["t_end"] + 1e-15)
    assert np.all(r["t_issue"] >= res.starts[r["rank"]] - 1e-15)  # no copy before its rank started
    for rank in range(len(plans)):  # a lane runs its copies one after the other, in plan order
        for lane in np.unique(r["lane"][r["rank"] == rank]):
            sel = np.nonzero((r["rank"] == rank) & (r["lane"] == lane))[0]
            assert np.all(np.diff(r["t_issue"][sel]) >= 0)
            assert np.all(r["t_issue"][sel][1:] >= r["t_end"][sel][:-1] - 1e-12)


def _no_overlap(intervals):
    intervals = sorted(intervals)
    return all(b0 >= a1 - 1e-12 for (a0, a1), (b0, b1) in zip(intervals, intervals[1:]))


@pytest.mark.parametrize("schedule", ["naive", "rotated", "round_robin", "parallel", "batch", "tdm",
                                      "tdm_source"])
def test_records_are_consistent_with_skew(schedule, seed):
    rng = np.random.default_rng(seed)
    starts = rng.uniform(0, 2e-3, 4)
    res, plans, _ = run("full", schedule, n=32 * MiB, chunk=8 * MiB, starts=starts)
    _check_records(res, plans)
    assert np.all(res.ends >= res.starts)
    assert res.records.shape[0] == sum(len(p) for p in plans)


def test_fifo_arbitration_serves_one_reader_per_source(seed):
    starts = np.random.default_rng(seed).uniform(0, 1e-3, 4)
    res, plans, _ = run("full", "parallel", n=32 * MiB, chunk=8 * MiB, starts=starts, arbitration="fifo")
    _check_records(res, plans)
    r = res.records
    for s in range(4):
        sel = r["src"] == s
        assert _no_overlap(list(zip(r["t_data"][sel], r["t_end"][sel])))


def test_issue_fifo_runs_each_source_in_issue_order():
    res, plans, _ = run("full", "rotated", n=32 * MiB, executor="issue_fifo")
    r = res.records
    for s in range(4):
        sel = np.nonzero(r["src"] == s)[0]  # records are in rank-major (issue) order
        assert np.all(np.diff(r["t_issue"][sel]) > 0)
        assert _no_overlap(list(zip(r["t_issue"][sel], r["t_end"][sel])))


def test_issue_order_by_slot_removes_the_harness_drift():
    slow, _, _ = run("full", "rotated", n=GiB, executor="issue_fifo", issue_order="stream")
    fast, _, _ = run("full", "rotated", n=GiB, executor="issue_fifo", issue_order="slot")
    assert fast.makespan < 0.5 * slow.makespan


def test_slot_sync_starts_a_slot_after_every_earlier_slot(seed):
    f = M.h200(4)
    starts = np.random.default_rng(seed).uniform(0, 1e-3, 4)
    for sync in ("slot", "source"):
        res, plans, _ = run("full", "round_robin", n=16 * MiB, chunk=4 * MiB, starts=starts, options={"sync": sync})
        r = res.records
        for i in range(r.shape[0]):
            if sync == "slot":
                earlier = r["slot"] < r["slot"][i]
            else:
                earlier = (r["slot"] < r["slot"][i]) & (r["src"] == r["src"][i])
            if earlier.any():
                assert r["t_issue"][i] >= r["t_end"][earlier].max() + f.flag_latency_s - 1e-12
        # every slot is a permutation, so a source never has two readers at once
        for s in range(4):
            sel = r["src"] == s
            assert _no_overlap(list(zip(r["t_data"][sel], r["t_end"][sel])))


def test_lanes_beyond_hardware_queues_share_them():
    f = M.h200(8).with_(max_streams=3)
    res, plans, _ = run("full", "parallel", G=8, n=8 * MiB, fabric=f)
    assert set(res.records["lane"].tolist()) == {0, 1, 2}
    _check_records(res, plans)


# ---- arguments ------------------------------------------------------------------------------------
def test_bad_arguments_name_themselves():
    f = M.h200(4)
    plans = make_plans("full", parse_schedule("naive"), 4, MiB, 0)
    with pytest.raises(InvalidArgumentError, match="copy engine options: got \\['warp'\\]"):
        M.simulate(plans, f, options={"warp": 9})
    with pytest.raises(InvalidTypeError, match="^streams"):
        M.simulate(plans, f, options={"streams": "3"})
    with pytest.raises(InvalidArgumentError, match="^executor: got 'gpu'"):
        M.simulate(plans, f, executor="gpu")
    with pytest.raises(InvalidArgumentError, match="^plans"):
        M.simulate(plans[:3], f)
    with pytest.raises(InvalidArgumentError, match="^starts"):
        M.simulate(plans, f, starts=[0, 0, 0, -1])
    with pytest.raises(InvalidArgumentError, match="issue_fifo"):
        M.simulate(plans, f, executor="issue_fifo", options={"sync": "slot"})
    with pytest.raises(InvalidArgumentError, match="^egress_Bps"):
        f.with_(egress_Bps=0)
    assert math.isclose(M.pair_rate(f, GiB), GiB / (f.copy_overhead_s + GiB / f.pair_Bps))


def test_model_options_follow_the_gpu_rule():
    """One validation rule: the model differs from the GPU engines only in its default api."""
    from dwdp_comm.engine_options import parse_engine_options
    from dwdp_comm.bench.model import parse_options
    for opts in ({}, {"streams": 3}, {"api": "batch", "distribute": "slot"}, {"sync": "slot"}):
        gpu, model = parse_engine_options(opts, "gpu"), parse_options(opts)
        assert {**gpu, "api": None} == {**model, "api": None}
        assert model["api"] == opts.get("api", "memcpy")
    for bad in ({"graph": True}, {"sync": "barrier"}, {"streamz": 1}):
        with pytest.raises(InvalidArgumentError):
            parse_options(bad)


# ---- one lane rule: the model places every copy where the GPU executor does ------------------------
@pytest.mark.parametrize("opts", [{"streams": 1}, {"streams": 2}, {"streams": 3}, {"streams": 2, "distribute": "slot"},
                                  {"streams": 5, "distribute": "slot"}])
def test_model_and_executor_put_every_copy_on_the_same_lane(monkeypatch, opts):
    """Plans with local copies (gather mode: a rank copies its own experts into the slot) run through
    the executor on the fake CUDA runtime and through the model: each copy on the same lane."""
    from tests.helpers import fake_cuda
    from dwdp_comm.backends.cuda import executor, memory
    from dwdp_comm.planner import CopyRange, make_plan
    fake = fake_cuda.install(monkeypatch)
    G, n = 4, 1 << 14
    opts = {**opts, "api": "memcpy"}
    heaps = [np.zeros(n, dtype=np.uint8) for _ in range(G)]
    plans = [make_plan([CopyRange(s, 0, s * n, n) for s in range(G)], rank=r, group_size=G, policy="round_robin",
                       chunk_nbytes=n // 4) for r in range(G)]  # every rank also reads itself: local copies
    res = M.simulate(plans, M.h200(G), options=opts)
    for r in range(G):
        dst_data = np.zeros(G * n, dtype=np.uint8)
        dst = memory.DeviceBuffer(fake_cuda.HostAlloc(dst_data))
        eng = executor.CopyExecutor(device=0, rank=r, group_size=G, src_ptrs=[int(h.ctypes.data) for h in heaps],
                                    src_nbytes=n, **{k: v for k, v in M.parse_options(opts).items() if k != "sync"})
        fake.done.clear()
        eng.submit(plans[r], src_base=0, dst=dst, dst_base=0)
        fake.progress()
        lane_of_dst = {e[2] - int(dst.ptr): eng.streams.index(e[1]) for e in fake.done if e[0] == "copy"}
        eng.close()
        want = [lane_of_dst[int(d)] for d in plans[r].dst_offset]
        got = res.records["lane"][res.records["rank"] == r].tolist()
        assert got == want, (r, plans[r].src_rank.tolist())
        assert any(int(s) == r for s in plans[r].src_rank)


# ---- the fast paths against the event simulation ----------------------------------------------------
_SCHEDULES = ["naive", "rotated", "round_robin", "batch", "parallel", "parallel+api=batch", "tdm", "tdm_source",
              "round_robin+streams=2", "tdm+streams=2+distribute=slot", "rotated+api=batch+streams=3"]


def _local_plans(G, n, chunk, policy):
    """Every rank also copies its own block (gather mode): local copies on the local lane."""
    from dwdp_comm.planner import CopyRange, make_plan
    return [make_plan([CopyRange(s, 0, s * n, n) for s in range(G)], rank=r, group_size=G, policy=policy,
                      chunk_nbytes=chunk) for r in range(G)]


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.sampled_from(_SCHEDULES), st.sampled_from(["full", "ring", "all-to-one", "swap"]),
       st.sampled_from([(16 * MiB, 0), (16 * MiB, 4 * MiB), (24 * MiB, 5 * MiB), (64 * MiB, 8 * MiB)]),
       st.sampled_from(["fair", "fifo"]), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_auto_agrees_with_the_event_simulation(G, schedule, pattern, size, arbitration, skew, local, seed):
    """simulate(method="auto") (the rotation quotient, coalesced runs, or the event simulation)
    against the event simulation of every copy on random small cases: every rank's end within 2 %,
    to rounding where the method is exact."""
    n, chunk = size
    sch = parse_schedule(schedule)
    opts = sch.engine_options(G)
    plans = (_local_plans(G, n, chunk or n, sch.policy) if local
             else make_plans(pattern, sch, G, n, chunk))
    f = M.h200(G)
    starts = np.random.default_rng(seed).uniform(0, 1e-3, G) if skew else None
    fast = M.simulate(plans, f, options=opts, starts=starts, arbitration=arbitration)
    ref = M.simulate(plans, f, options=opts, starts=starts, arbitration=arbitration, method="event")
    assert ref.info["method"] == "event" and fast.info["method"] in ("quotient", "coalesced", "event")
    tol = 1e-9 if fast.info["exact"] else 0.02
    assert np.allclose(fast.durations, ref.durations, rtol=tol, atol=1e-12), (fast.info, fast.durations,
                                                                              ref.durations)
    _check_records(fast, plans)
    assert fast.records.shape[0] == sum(len(p) for p in plans)


@pytest.mark.parametrize("schedule, chunk, arbitration, method", [
    ("round_robin", 8 * MiB, "fair", "quotient"), ("parallel", 0, "fair", "quotient"),
    ("parallel+api=batch", 8 * MiB, "fair", "quotient"), ("tdm_source", 4 * MiB, "fifo", "quotient"),
    ("batch", 2 * MiB, "fifo", "quotient"), ("naive", 8 * MiB, "fair", "coalesced"),
    ("naive", 0, "fifo", "event"), ("parallel", 8 * MiB, "fifo", "event")])
def test_each_method_where_it_applies(schedule, chunk, arbitration, method):
    """Which computation auto picks, and that the exact ones match the event simulation record by
    record (the quotient: every rank's copies at rank 0's times)."""
    G = 8
    sch = parse_schedule(schedule)
    plans = make_plans("full", sch, G, 32 * MiB, chunk)
    kw = dict(options=sch.engine_options(G), arbitration=arbitration)
    fast = M.simulate(plans, M.h200(G), **kw)
    ref = M.simulate(plans, M.h200(G), method="event", **kw)
    assert fast.info["method"] == method
    if fast.info["exact"]:
        for k in ("t_issue", "t_data", "t_end"):
            np.testing.assert_allclose(fast.records[k], ref.records[k], rtol=1e-9, atol=1e-12)
    else:  # naive with single copies of 8 MiB chunks: their issue costs moved to each source's start
        assert fast.makespan == pytest.approx(ref.makespan, rel=0.02)


def test_coalesced_runs_with_costs_only_where_measured():
    """Runs whose later copies cost something to issue are merged only with equal starts and from
    APPROX_MIN_GROUP ranks; below, or with skew, the event simulation runs."""
    for G, starts, want in [(M.APPROX_MIN_GROUP - 1, None, "event"), (M.APPROX_MIN_GROUP, None, "coalesced"),
                            (M.APPROX_MIN_GROUP, "skew", "event")]:
        plans = make_plans("full", parse_schedule("naive"), G, 16 * MiB, 4 * MiB)
        st = np.linspace(0, 1e-4, G) if starts else None
        assert M.simulate(plans, M.h200(G), starts=st).info["method"] == want, (G, starts)
    plans = make_plans("full", parse_schedule("naive"), 3, 16 * MiB, 4 * MiB)  # batch: nothing moves
    res = M.simulate(plans, M.h200(3), options={"api": "batch"}, starts=[0, 1e-4, 3e-4])
    assert res.info["method"] == "coalesced" and res.info["exact"]


def test_method_argument_is_checked():
    plans = make_plans("full", parse_schedule("naive"), 4, MiB, 0)
    with pytest.raises(InvalidArgumentError, match="^method: got 'fast'"):
        M.simulate(plans, M.h200(4), method="fast")


def test_bench_model_speed_script(tmp_path):
    """perf/bench_model_speed.py at G = 4 (both paths finish and agree): it runs and writes its JSON."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "speed.json"
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "perf.bench_model_speed", "--groups", "4", "--no-cli", "--out",
                          str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert {"commit", "date", "host", "load_avg_start"} <= set(doc["run"])
    rows = {r["what"]: r for r in doc["rows"]}
    assert set(rows) == {"predict", "contention"}
    for r in rows.values():
        assert r["event"]["finished"] and r["auto"]["finished"] and r["max_rel_diff"] < 0.02
