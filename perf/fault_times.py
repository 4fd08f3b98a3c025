"""Time-to-error of each fault case of issue 13 on the sim backend (CPU).

Runs the rank functions of perf/fault_cases.py through dwdp_comm.launch.launch and records, per case,
what the surviving ranks raised and how long after the fault they raised it (measured inside the
ranks), plus the wall time of the whole launch. Writes perf/results/fault_times_cpu.json with the
machine, date and commit.

Usage: python3 -m perf.fault_times [--json FILE]   (from the repository root)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import dwdp_comm as dc
from dwdp_comm.bench import record
from dwdp_comm.launch import launch
from perf import fault_cases as cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _case(name, fn, *args, **kw):
    t0 = time.perf_counter()
    try:
        res = launch(fn, *args, **kw)
        launch_error = None
    except dc.RankFailedError as exc:
        res, launch_error = None, str(exc).splitlines()[0]
    return {"case": name, "wall_s": round(time.perf_counter() - t0, 3), "results": res, "launch_error": launch_error}


def _errors_row(r, errors) -> dict:
    """A row from the errors the ranks raised (dicts with type, missing and time_to_error_s)."""
    errors = [e for e in errors if e]
    row = {"case": r["case"], "wall_s": r["wall_s"], "raised": sorted({e["type"] for e in errors}),
           "time_to_error_s": max(e["time_to_error_s"] for e in errors) if errors else None}
    missing = [e.get("missing") for e in errors if e.get("missing")]
    if missing:
        row["missing"] = missing[0]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=os.path.join(ROOT, "perf", "results", "fault_times_cpu.json"))
    args = ap.parse_args()
    rows = []

    r = _case("commit: one rank's shard is a meta tensor (3 ranks)", cases.commit_local_failure, 3, 1, "meta", 1)
    rows.append({"case": r["case"], "wall_s": r["wall_s"], "raised": sorted({x["error"]["type"] for x in r["results"]}),
                 "time_to_error_s": max(x["time_to_error_s"] for x in r["results"])})

    r = _case("commit: one rank's shard is sparse (3 ranks)", cases.commit_local_failure, 3, 1, "sparse", 1)
    rows.append({"case": r["case"], "wall_s": r["wall_s"], "raised": sorted({x["error"]["type"] for x in r["results"]}),
                 "time_to_error_s": max(x["time_to_error_s"] for x in r["results"])})

    for timeout in (2.0, 5.0):
        r = _case(f"stuck rank at a barrier, timeout {timeout:g} s (3 ranks)", cases.stuck_rank, 3, 2, timeout + 6,
                  options={"timeout": timeout}, timeout=60)
        got = [x for x in r["results"] if x]
        rows.append({"case": r["case"], "wall_s": r["wall_s"], "raised": sorted({x["type"] for x in got}),
                     "missing": got[0]["missing"], "time_to_error_s": max(x["time_to_error_s"] for x in got)})

    for where in ("barrier", "commit"):
        with tempfile.TemporaryDirectory() as d:
            r = _case(f"rank dies (os._exit) {'before a barrier' if where == 'barrier' else 'inside commit heap step'} "
                      "(3 ranks)", cases.dead_rank, 3, 1, where, d, timeout=60)
            got = [json.load(open(p)) for p in glob.glob(os.path.join(d, "*.json"))]
        rows.append({"case": r["case"], "wall_s": r["wall_s"], "raised": sorted({x["type"] for x in got}),
                     "missing": got[0]["missing"] if got else None, "launch_error": r["launch_error"],
                     "time_to_error_s": max(x["time_to_error_s"] for x in got) if got else None})

    r = _case("exception inside `with store` on one rank, timeout 2 s (3 ranks)", cases.exit_during_exception, 3, 0,
              options={"timeout": 2}, timeout=60)
    row = _errors_row(r, [x["error"] for x in r["results"][1:]])
    row["exit_s_on_failing_rank"] = r["results"][0]["exit_s"]
    rows.append(row)

    r = _case("ranks in different steps: a barrier meets a commit (3 ranks)", cases.steps_mismatch, 3,
              options={"timeout": 20}, timeout=60)
    rows.append(_errors_row(r, r["results"]))

    r = _case("a copy failure on one rank found in WeightStore.close (3 ranks)", cases.close_with_failed_copy, 3, 1,
              1, options={"timeout": 20}, timeout=60)
    rows.append(_errors_row(r, r["results"]))

    r = _case("a write into one rank's heap, found by testing.check_local_unchanged (3 ranks)",
              cases.heap_write_detection, 3, 2, 1, timeout=60)
    rows.append(_errors_row(r, [x["after_heap_write"] for x in r["results"]]))

    r = _case("nvshmem (fake nvshmem4py): one rank aborts its heap, the others close, timeout 2 s (3 ranks)",
              cases.nvshmem_heap_abort, 3, 1, options={"timeout": 2}, timeout=60)
    row = _errors_row(r, [x["error"] for x in r["results"]])
    row["abort_s_on_failing_rank"] = r["results"][1]["seconds"]
    row["nvshmem_collectives_entered"] = sorted({c for x in r["results"] for c in x["calls"]})
    rows.append(row)

    r = _case("nvshmem (fake nvshmem4py): one rank never reaches heap creation, timeout 2 s (2 ranks)",
              cases.nvshmem_heap_late_rank, 2, 1, options={"timeout": 2}, timeout=60)
    row = _errors_row(r, [x["error"] for x in r["results"] if x])
    row["nvshmem_collectives_entered"] = sorted({c for x in r["results"] if x for c in x["calls"]})
    rows.append(row)

    t0 = time.perf_counter()
    try:
        launch(cases.finish_or_sleep, 3, [2], timeout=20)
        msg = None
    except dc.RankFailedError as exc:
        msg = str(exc).splitlines()[0]
        unfinished = exc.unfinished
    rows.append({"case": "launch's own timeout (20 s): rank 2 never finishes (3 ranks)",
                 "wall_s": round(time.perf_counter() - t0, 3), "raised": ["RankFailedError"] if msg else [],
                 "unfinished": unfinished if msg else None, "message": msg})

    with tempfile.TemporaryDirectory() as d:
        code = ("import dwdp_comm as dc; from perf import fault_cases; "
                f"dc.launch.launch(fault_cases.pid_and_sleep, 2, {d!r}, timeout=300)")
        p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True)  # cwd: perf importable
        while len(glob.glob(os.path.join(d, "*.pid"))) < 2:
            time.sleep(0.05)
        pids = [int(open(f).read()) for f in glob.glob(os.path.join(d, "*.pid"))]
        t0 = time.perf_counter()
        p.kill()
        p.wait()
        while any(os.path.exists(f"/proc/{q}") and open(f"/proc/{q}/stat").read().split(") ")[1][0] != "Z"
                  for q in pids) and time.perf_counter() - t0 < 30:
            time.sleep(0.005)
        rows.append({"case": "kill -9 of the launching parent (2 ranks)", "ranks_gone_after_s":
                     round(time.perf_counter() - t0, 3)})

    doc = {"schema": "dwdp/fault_times/v1", "date": record.utc_date(),
           "commit": record.commit() or "unknown", "machine": record.machine_lines(), "backend": "sim", "rows": rows}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
