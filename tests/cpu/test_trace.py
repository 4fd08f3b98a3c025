"""Chrome-trace JSON from telemetry: the structure Perfetto needs (every slice with name/ts/dur/pid/tid,
named processes and tracks, no partial overlap on a track), copies inside their prefetch window and
waits inside their layer, one pid per rank, hosts aligned on wall-clock time; perf/trace_png.py."""

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

import dwdp_comm as dc
from dwdp_comm.telemetry import PrefetchRecord, SourceCopy, Telemetry
from dwdp_comm.trace import COMPUTE_TID, chrome_trace, write_trace
from tests.helpers import telemetry_rankfns as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS = 1e-3  # microseconds: float rounding of ts + dur


def validate(doc: dict) -> dict:
    """Check a trace document; return its slices grouped by (pid, tid)."""
    doc = json.loads(json.dumps(doc))  # JSON-serialisable, and what a viewer reads
    assert isinstance(doc["traceEvents"], list) and doc["displayTimeUnit"] in ("ms", "ns")
    names, tracks = {}, defaultdict(list)
    for e in doc["traceEvents"]:
        assert e["ph"] in ("X", "M"), e
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int) and isinstance(e["name"], str)
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "process_sort_index", "thread_name", "thread_sort_index")
            if e["name"] in ("process_name", "thread_name"):
                names[(e["pid"], e["tid"] if e["name"] == "thread_name" else None)] = e["args"]["name"]
            continue
        assert isinstance(e["ts"], float) and isinstance(e["dur"], float) and e["dur"] >= 0 and e["ts"] >= -EPS
        assert isinstance(e["cat"], str) and isinstance(e["args"], dict)
        tracks[(e["pid"], e["tid"])].append(e)
    for pid, tid in tracks:
        assert (pid, None) in names and (pid, tid) in names, (pid, tid)  # every process and track is named
    for key, evs in tracks.items():  # slices on one track nest or are disjoint (no partial overlap)
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"] + EPS:
                stack.pop()
            if stack:
                assert e["ts"] + e["dur"] <= stack[-1]["ts"] + stack[-1]["dur"] + EPS, (key, stack[-1], e)
            stack.append(e)
    return tracks


def _inside(inner, outer) -> bool:
    return outer["ts"] - EPS <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + EPS


def test_trace_of_a_sim_run(seed, tmp_path):
    res = dc.testing.launch(T.fields, 3, 7, seed, timeout=180)
    tels = [r["late"] for r in res]
    doc = write_trace(tmp_path / "t.json", tels, title="test")
    assert json.loads((tmp_path / "t.json").read_text()) == json.loads(json.dumps(doc))
    assert chrome_trace([t.as_dict() for t in reversed(tels)], title="test") == doc  # dicts, any order
    tracks = validate(doc)
    assert {pid for pid, _ in tracks} == {0, 1, 2}  # one pid per rank
    assert doc["otherData"]["ranks"] == [0, 1, 2] and doc["otherData"]["timed_copies"]
    slices = [e for evs in tracks.values() for e in evs]
    for rank, tel in enumerate(tels):
        mine = [e for e in slices if e["pid"] == rank]
        jobs = {e["args"]["seq"]: e for e in mine if e["cat"] == "prefetch"}
        layers = {e["args"]["seq"]: e for e in mine if e["cat"] == "compute"}
        assert sorted(jobs) == [r.seq for r in tel.prefetches]  # every prefetch has its copy window
        # compute slices of the waited records, on the compute stream track
        assert sorted(layers) == [r.seq for r in tel.prefetches if r.wait_start_s is not None]
        assert all(e["tid"] == COMPUTE_TID for e in layers.values())
        copies = [e for e in mine if e["cat"] == "copy"]
        assert len(copies) == sum(len(r.sources) for r in tel.prefetches)
        for c in copies:  # copies per peer lie inside their prefetch window
            job = jobs[c["args"]["seq"]]
            assert _inside(c, job), (c, job)
            assert c["name"] == f"L{job['args']['layer']} <- r{c['args']['src_rank']}"
        for w in (e for e in mine if e["cat"] == "exposed_wait"):
            assert _inside(w, layers[w["args"]["seq"]])
        by_seq = {r.seq: r for r in tel.prefetches}
        for s, e in jobs.items():
            assert e["args"]["nbytes"] == by_seq[s].nbytes
            assert e["dur"] == pytest.approx(by_seq[s].copy_s * 1e6, abs=EPS)


def _record(seq, start, *, host_shift=0.0, rank=0, slot=0, sources=((1, 0.0, 2.0),)):
    src = tuple(SourceCopy(s, 100, start + a + host_shift, start + b + host_shift, b - a, 0) for s, a, b in sources)
    t0 = start + host_shift
    return PrefetchRecord(seq=seq, layer=seq, slot=slot, rank=rank, nbytes=100 * len(src), sources=src,
                          issue_s=t0 - 1, submit_s=t0 - 0.5, start_s=t0, end_s=t0 + 3, wait_start_s=t0 + 1,
                          wait_end_s=t0 + 3, exposed_wait_s=2.0, release_s=t0 + 4)


def test_hosts_align_on_wall_clock_and_overlaps_get_their_own_track():
    # rank 1's host clock reads 1000 s more than rank 0's for the same wall-clock instant
    a = Telemetry(rank=0, group_size=2, backend="sim", host="a", clock_offset_s=5000.0, timed=True,
                  prefetches=[_record(0, 10.0)])
    b = Telemetry(rank=1, group_size=2, backend="sim", host="b", clock_offset_s=4000.0, timed=True,
                  prefetches=[_record(0, 10.0, host_shift=1000.0, rank=1)])
    doc = chrome_trace([a, b])
    assert doc["otherData"]["clock"].startswith("wall clock")
    tracks = validate(doc)
    jobs = {pid: e for (pid, _), evs in tracks.items() for e in evs if e["cat"] == "prefetch"}
    assert jobs[0]["ts"] == jobs[1]["ts"] == 0.0  # the same instant
    # one host: its perf_counter clock is shared, offsets ignored
    same = chrome_trace([a, Telemetry(**{**b.__dict__, "host": "a"})])
    jobs = [e for e in same["traceEvents"] if e.get("cat") == "prefetch"]
    assert sorted(e["ts"] for e in jobs) == [0.0, 1000.0 * 1e6]
    # copies of one source whose windows overlap (two lanes) go to a second track of that source
    c = Telemetry(rank=0, group_size=3, backend="x", host="a", clock_offset_s=0.0, timed=True,
                  prefetches=[_record(0, 0.0, sources=((1, 0.0, 2.0), (2, 0.0, 1.0))),
                              _record(1, 1.0, slot=1, sources=((1, 0.0, 1.0),))])
    tracks = validate(chrome_trace([c]))
    names = {e["args"]["name"] for e in chrome_trace([c])["traceEvents"] if e["name"] == "thread_name"}
    assert {"copies from rank 1", "copies from rank 1 (2)", "copies from rank 2", "compute stream",
            "compute stream (2)", "prefetch slot 0", "prefetch slot 1"} == names


def test_trace_rejects_bad_input():
    with pytest.raises(dc.InvalidArgumentError, match="^telemetries: "):
        chrome_trace([])
    t = Telemetry(rank=0, group_size=1, backend="sim", host="a", clock_offset_s=0.0, timed=False)
    with pytest.raises(dc.InvalidArgumentError, match="^telemetries: "):
        chrome_trace([t, t])
    with pytest.raises(dc.InvalidArgumentError, match="^telemetries: "):
        chrome_trace(["x"])
    validate(chrome_trace([t]))  # no records: a valid, empty timeline


def test_trace_png_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    t = Telemetry(rank=0, group_size=2, backend="sim", host="a", clock_offset_s=0.0, timed=True,
                  prefetches=[_record(0, 0.0), _record(1, 4.0, slot=1)])
    write_trace(tmp_path / "t.json", [t])
    out = tmp_path / "t.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "perf", "trace_png.py"), str(tmp_path / "t.json"),
                        str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "wrote" in r.stdout
