"""perf/bench_graphs.py --smoke on the CPU (sim backend, eager only): it runs and writes its JSON."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_graphs_smoke(tmp_path):
    out = tmp_path / "bench_graphs.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "perf.bench_graphs", "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert {"machine", "date", "commit", "world_size", "ranks_share_gpus", "model"} <= set(meta)
    assert meta["backend"] == "sim" and meta["world_size"] == 2 and meta["ranks_share_gpus"] is False
    assert len(data["per_rank"]) == 2
    for r in data["per_rank"]:
        assert [row["tokens_per_rank"] for row in r["rows"]] == [16, 32]
        assert r["prefetched_nbytes"] > 0
        for row in r["rows"]:
            e = row["eager"]
            assert e["host_ms"] > 0 and e["iter_ms"] >= e["host_ms"] and len(e["iter_ms_all"]) == 2
            assert row["graph"] is None  # no CUDA graphs on sim
    assert "eager host us/layer" in run.stdout
