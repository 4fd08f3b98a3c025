"""perf/bench_telemetry.py --smoke on the CPU (sim backend): it runs, writes its JSON with the three
modes and their ratios, and a trace file every rank is in."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_telemetry_smoke(tmp_path):
    out, trace = tmp_path / "bt.json", tmp_path / "trace.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "perf", "bench_telemetry.py"), "--smoke", "--out", str(out),
                          "--trace", str(trace)], capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert {"date", "commit", "machine"} <= set(data["record"]) and data["backend"] == "sim"
    assert data["world_size"] == 2 and len(data["per_rank"]) == 2 and data["trace"] == str(trace)
    for r in data["per_rank"]:
        assert r["engine_timed"] and "telemetry" not in r  # the records went into the trace, not the JSON
        assert [row["tokens_per_rank"] for row in r["rows"]] == [16, 32]
        for row in r["rows"]:
            for m in ("off", "on", "routing"):
                assert row[m]["iter_ms"] > 0 and len(row[m]["iter_ms_all"]) == 2 * 2  # iters x rounds
            assert row["ratio_on"] == row["on"]["iter_ms"] / row["off"]["iter_ms"]
            assert row["readback_ms_per_forward"] >= 0
    doc = json.loads(trace.read_text())
    assert {e["pid"] for e in doc["traceEvents"]} == {0, 1}
    cats = {e.get("cat") for e in doc["traceEvents"] if e["ph"] == "X"}
    assert {"compute", "prefetch", "copy"} <= cats
    assert "on/off" in run.stdout and "layer 0:" in run.stdout
