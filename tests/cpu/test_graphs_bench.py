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


def test_deepseek_eager_vs_graph_smoke(tmp_path):
    """perf/deepseek_eager_vs_graph.py --smoke (CPU: toy model, sim, no graphs): every phase's rows."""
    out = tmp_path / "ds.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "perf.deepseek_eager_vs_graph", "--smoke", "--iters", "2", "--out",
                          str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    r = json.loads(out.read_text())["per_rank"][0]
    phases = [row["phase"] for row in r["rows"]]
    assert phases == ["example"] * 2 + ["seen"] * 2 + ["eager"] * 2  # no graph phase on CPU
    first = sum(r["batches"][0])
    assert all(row["tokens"] == first for row in r["rows"] if row["phase"] == "eager")
    assert [row["tokens"] for row in r["rows"] if row["phase"] == "example"] == [sum(b) for b in r["batches"][1:]]
    assert r["summary"]["example_over_seen"] > 0 and r["graph_vs_eager_rel_error"] is None
